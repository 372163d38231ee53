//! A row image: its columns and their values, kept in column-name order in one vector.
//!
//! Every change carries one or two of these, so their cost is paid millions of times:
//! a vector of (name, value) cells is one allocation where a map is a tree of nodes, and
//! the names are shared text (`Arc<str>`) that a source takes from its table definition
//! and a decoder takes from the names it decoded last, instead of a fresh string for
//! every column of every change. Kept sorted by name, a row serializes exactly as the
//! JSON object it used to be (`{"a":…,"b":…}`) and two rows with the same columns and
//! values are equal whatever order they were built in.

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

/// Hands `write` a number value's text, as serde_json writes it. Integers (keys and counts,
/// most numbers in a change) are formatted without `core::fmt` and without allocating.
pub fn with_number_text<R>(number: &serde_json::Number, write: impl FnOnce(&str) -> R) -> R {
    let mut digits = itoa::Buffer::new();
    match (number.as_i64(), number.as_u64()) {
        (Some(i), _) => write(digits.format(i)),
        (_, Some(u)) => write(digits.format(u)),
        _ => write(&number.to_string()),
    }
}

/// Columns and their values, in column-name order; at most one value per column.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Row {
    cells: Vec<(Arc<str>, Value)>,
}

impl Row {
    /// An empty row.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty row with room for `columns` cells.
    pub fn with_capacity(columns: usize) -> Self {
        Self {
            cells: Vec::with_capacity(columns),
        }
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether the row has no column.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Where `column` is, or where it would go.
    fn place(&self, column: &str) -> Result<usize, usize> {
        // Rows are mostly built in name order: appending needs one comparison.
        match self.cells.last() {
            None => Err(0),
            Some((last, _)) if **last < *column => Err(self.cells.len()),
            _ => self
                .cells
                .binary_search_by(|(name, _)| (**name).cmp(column)),
        }
    }

    /// The value of `column`.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.place(column).ok().map(|i| &self.cells[i].1)
    }

    /// The value of `column`, to change it.
    pub fn get_mut(&mut self, column: &str) -> Option<&mut Value> {
        self.place(column).ok().map(|i| &mut self.cells[i].1)
    }

    /// The values of `columns`, in their order, JSON null for a column the row lacks (as
    /// indexing gives). Columns in name order, as a row's own are, are found in one walk
    /// along the row, so a sink converting a batch's rows costs no search per value;
    /// columns out of order are searched for.
    pub fn values_for<'a, C: AsRef<str>>(
        &'a self,
        columns: &'a [C],
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let mut next = 0;
        columns.iter().map(move |column| {
            let column = column.as_ref();
            while let Some((name, value)) = self.cells.get(next) {
                match (**name).cmp(column) {
                    std::cmp::Ordering::Less => next += 1,
                    std::cmp::Ordering::Equal => {
                        next += 1;
                        return value;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            &self[column]
        })
    }

    /// Whether the row has `column`.
    pub fn contains_key(&self, column: &str) -> bool {
        self.place(column).is_ok()
    }

    /// Sets `column` to `value`; returns the value it replaced.
    pub fn insert(&mut self, column: impl Into<Arc<str>>, value: Value) -> Option<Value> {
        let column = column.into();
        match self.place(&column) {
            Ok(i) => Some(std::mem::replace(&mut self.cells[i].1, value)),
            // Rows are mostly built in name order: at the end, a push.
            Err(i) if i == self.cells.len() => {
                self.cells.push((column, value));
                None
            }
            Err(i) => {
                self.cells.insert(i, (column, value));
                None
            }
        }
    }

    /// Removes `column`; returns its value.
    pub fn remove(&mut self, column: &str) -> Option<Value> {
        self.place(column).ok().map(|i| self.cells.remove(i).1)
    }

    /// Columns and values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.into_iter()
    }

    /// Columns and values, in name order, values to change.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Value)> {
        self.cells.iter_mut().map(|(name, value)| (&**name, value))
    }

    /// Column names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.cells.iter().map(|(name, _)| &**name)
    }

    /// Values, in column-name order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.cells.iter().map(|(_, value)| value)
    }

    /// The row as a JSON object.
    pub fn into_json(self) -> Value {
        Value::Object(
            self.cells
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
        )
    }

    /// A JSON object's members as a row; `None` for anything but an object.
    pub fn from_json(value: Value) -> Option<Row> {
        match value {
            Value::Object(members) => Some(members.into_iter().collect()),
            _ => None,
        }
    }
}

impl<Q: AsRef<str> + ?Sized> std::ops::Index<&Q> for Row {
    type Output = Value;

    /// The value of `column`, or JSON null when the row has no such column (as
    /// `serde_json::Value` indexes).
    fn index(&self, column: &Q) -> &Value {
        const NULL: Value = Value::Null;
        self.get(column.as_ref()).unwrap_or(&NULL)
    }
}

impl<K: Into<Arc<str>>> FromIterator<(K, Value)> for Row {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(cells: I) -> Self {
        let cells = cells.into_iter();
        let mut row = Row::with_capacity(cells.size_hint().0);
        for (name, value) in cells {
            row.insert(name, value);
        }
        row
    }
}

impl IntoIterator for Row {
    type Item = (Arc<str>, Value);
    type IntoIter = std::vec::IntoIter<(Arc<str>, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.cells.into_iter()
    }
}

/// A cell seen as (column, value).
type CellView<'a> = fn(&'a (Arc<str>, Value)) -> (&'a str, &'a Value);

impl<'a> IntoIterator for &'a Row {
    type Item = (&'a str, &'a Value);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (Arc<str>, Value)>, CellView<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        self.cells.iter().map(|(name, value)| (&**name, value))
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl fmt::Display for Row {
    /// The row as JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.cells.len()))?;
        for (name, value) in &self.cells {
            map.serialize_entry(&**name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = Row;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of columns")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
                let mut row = Row::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(name) = map.next_key_seed(ColumnName {
                    place: row.cells.len(),
                })? {
                    let value = map.next_value::<Value>()?;
                    row.insert(name, value);
                }
                Ok(row)
            }
        }
        deserializer.deserialize_map(RowVisitor)
    }
}

/// The name decoded at `place` in a row, shared with earlier rows' where it was the same
/// (serde's path: its visitors carry no state, so the names live per thread).
fn shared_name(place: usize, text: &str) -> Arc<str> {
    RECENT_NAMES.with(|names| names.borrow_mut().name(place, text))
}

thread_local! {
    static RECENT_NAMES: RefCell<RecentNames> = const { RefCell::new(RecentNames::new()) };
}

/// Column names decoded recently: for each place in a row, the last two names decoded
/// there (two, so that a table's keys and its images, decoded in turn, do not push each
/// other out). The changes of a table repeat their names in the same places, so a decoded
/// row shares them instead of allocating each. A decoder that reads rows itself keeps one
/// of these (no thread-local lookup per column); serde's path keeps one per thread.
#[derive(Default)]
pub struct RecentNames {
    by_place: Vec<[Option<Arc<str>>; 2]>,
}

/// Rows wider than this take their further names without looking them up.
const REMEMBERED_PLACES: usize = 256;

impl RecentNames {
    /// None remembered yet.
    pub const fn new() -> Self {
        Self {
            by_place: Vec::new(),
        }
    }

    /// The name remembered at `place` that `matches` accepts (it is given the newest
    /// first), so that a decoder reading its message in place can compare the text there
    /// with the names it expects before it reads the name afresh.
    pub fn find(&self, place: usize, mut matches: impl FnMut(&str) -> bool) -> Option<Arc<str>> {
        let [older, newer] = self.by_place.get(place)?;
        [newer, older]
            .into_iter()
            .flatten()
            .find(|name| matches(name))
            .cloned()
    }

    /// `text` as the name at `place`: the remembered one where it is the same, otherwise
    /// a new one that is remembered in place of the older of the two.
    pub fn name(&mut self, place: usize, text: &str) -> Arc<str> {
        if place >= REMEMBERED_PLACES {
            return text.into();
        }
        if self.by_place.len() <= place {
            self.by_place.resize(place + 1, [None, None]);
        }
        let slots = &mut self.by_place[place];
        for name in slots.iter().flatten() {
            if **name == *text {
                return name.clone();
            }
        }
        let name: Arc<str> = text.into();
        // The newer one moves to the back; the older one makes room.
        slots.swap(0, 1);
        slots[1] = Some(name.clone());
        name
    }
}

/// Deserializes a column name at a place in a row, shared with earlier rows' where the
/// same name was there.
struct ColumnName {
    place: usize,
}

impl<'de> DeserializeSeed<'de> for ColumnName {
    type Value = Arc<str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Arc<str>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for ColumnName {
    type Value = Arc<str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a column name")
    }

    fn visit_str<E>(self, text: &str) -> Result<Arc<str>, E> {
        Ok(shared_name(self.place, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_row_keeps_its_columns_in_name_order_like_a_json_object() {
        let mut row = Row::new();
        row.insert("b", json!(2));
        row.insert("a", json!(1));
        row.insert("c", json!(3));
        assert_eq!(row.insert("b", json!(20)), Some(json!(2)));
        assert_eq!(row.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(row.to_string(), r#"{"a":1,"b":20,"c":3}"#);
        assert_eq!(row["b"], json!(20));
        assert_eq!(row["missing"], Value::Null);
        assert_eq!(row.remove("a"), Some(json!(1)));
        assert_eq!(row.get("a"), None);
        assert!(row.contains_key("c"));
        let built_otherwise: Row = [("c", json!(3)), ("b", json!(20))].into_iter().collect();
        assert_eq!(row, built_otherwise);
        assert_eq!(
            Row::from_json(row.clone().into_json()).as_ref(),
            Some(&row),
            "round trip through a JSON object"
        );
    }

    #[test]
    fn number_text_is_what_serde_json_writes() {
        for value in [
            json!(0),
            json!(-1),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1.5),
            json!(-2.5e300),
        ] {
            let Value::Number(number) = &value else {
                unreachable!()
            };
            assert_eq!(with_number_text(number, str::to_string), value.to_string());
        }
    }

    #[test]
    fn values_for_gives_each_columns_value_in_any_order() {
        let row: Row = [
            ("a", json!(1)),
            ("b", json!(2)),
            ("c", json!(3)),
            ("d", json!(4)),
        ]
        .into_iter()
        .collect();
        let values = |columns: &[&str]| row.values_for(columns).cloned().collect::<Vec<_>>();
        assert_eq!(values(&["a", "c", "d"]), [json!(1), json!(3), json!(4)]);
        assert_eq!(values(&["b", "bb", "d"]), [json!(2), Value::Null, json!(4)]);
        assert_eq!(values(&["d", "a", "c"]), [json!(4), json!(1), json!(3)]);
        assert_eq!(values(&["z", "a"]), [Value::Null, json!(1)]);
        assert_eq!(values(&[]), Vec::<Value>::new());
    }

    #[test]
    fn decoding_matches_a_json_object_and_shares_repeated_names() {
        let text = r#"{"id":7,"name":"ada","note":null,"id":8}"#;
        let row: Row = serde_json::from_str(text).expect("decodes");
        let object: serde_json::Map<String, Value> = serde_json::from_str(text).expect("json");
        assert_eq!(
            row,
            object.into_iter().collect::<Row>(),
            "last duplicate wins"
        );
        let again: Row = serde_json::from_str(text).expect("decodes");
        let (first, second) = (row.cells[0].0.clone(), again.cells[0].0.clone());
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second row reuses the name"
        );
        let unsorted: Row = serde_json::from_str(r#"{"z":1,"a":2}"#).expect("decodes");
        assert_eq!(unsorted.keys().collect::<Vec<_>>(), ["a", "z"]);
        assert!(serde_json::from_str::<Row>("[1]").is_err());
    }

    #[test]
    fn recent_names_keep_the_last_two_names_at_each_place() {
        let mut names = RecentNames::new();
        let id = names.name(0, "id");
        let account = names.name(0, "account");
        assert!(Arc::ptr_eq(&id, &names.name(0, "id")), "shared, not new");
        assert!(Arc::ptr_eq(&account, &names.name(0, "account")));
        let found = names.find(0, |name| name == "id").expect("remembered");
        assert!(Arc::ptr_eq(&found, &id));
        assert!(names.find(1, |_| true).is_none(), "nothing at place 1 yet");
        names.name(0, "status");
        assert!(
            names.find(0, |name| name == "id").is_none(),
            "the older of the two made room"
        );
        assert!(names.find(0, |name| name == "account").is_some());
    }
}
