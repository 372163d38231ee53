//! Applying a batch the target rejected change by change, each under a savepoint inside
//! one transaction: a change the target rejects is undone alone and reported, the others
//! stay. Shared by the sinks; each supplies its way of running a statement and applying
//! one change.

use crate::{SinkChange, SinkError};
use std::future::Future;

/// What [`apply_each_under_a_savepoint`] needs of a sink, inside its open transaction.
pub trait ChangeByChange: Send {
    /// Runs a statement that returns no rows.
    fn statement(
        &mut self,
        sql: &'static str,
        what: &'static str,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Applies one change (and its history row, if kept).
    fn apply_one(
        &mut self,
        change: &SinkChange,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Forgets what the sink knows of its target tables: a rejection may come from a
    /// table that changed.
    fn forget_target_tables(&mut self);
}

/// Applies `changes` in order, each under a savepoint; returns the rejected ones (index,
/// reason). Any other error ends it (the caller rolls the transaction back).
pub async fn apply_each_under_a_savepoint<S: ChangeByChange>(
    sink: &mut S,
    changes: &[SinkChange],
) -> Result<Vec<(usize, String)>, SinkError> {
    let mut rejected = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        sink.statement("SAVEPOINT tidelink_change", "setting a savepoint")
            .await?;
        match sink.apply_one(change).await {
            Ok(()) => {
                sink.statement("RELEASE SAVEPOINT tidelink_change", "releasing a savepoint")
                    .await?;
            }
            Err(SinkError::Rejected(reason)) => {
                sink.statement(
                    "ROLLBACK TO SAVEPOINT tidelink_change",
                    "undoing a rejected change",
                )
                .await?;
                sink.forget_target_tables();
                rejected.push((i, reason));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(rejected)
}
