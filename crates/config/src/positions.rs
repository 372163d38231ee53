//! Where each key of a YAML document is: a map from the key paths validation reports
//! (`pipelines[0].sinks[1].batch_size`) to line and column, so a problem found after
//! parsing still points at its place in the file.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

enum Frame {
    Mapping { key: Option<String> },
    Sequence { index: usize },
}

struct Locator {
    stack: Vec<(String, Frame)>,
    positions: HashMap<String, (usize, usize)>,
}

impl Locator {
    /// The path of the node that starts now, if it is a value (not a mapping key).
    fn value_path(&self) -> Option<String> {
        let (path, frame) = self.stack.last()?;
        let join = |child: String| {
            if path.is_empty() {
                child
            } else {
                format!("{path}{child}")
            }
        };
        match frame {
            Frame::Mapping { key: Some(key) } => Some(join(if path.is_empty() {
                key.clone()
            } else {
                format!(".{key}")
            })),
            Frame::Mapping { key: None } => None,
            Frame::Sequence { index } => Some(join(format!("[{index}]"))),
        }
    }

    /// A value ended: the enclosing mapping waits for its next key, the sequence moves on.
    fn advance(&mut self) {
        match self.stack.last_mut() {
            Some((_, Frame::Mapping { key })) => *key = None,
            Some((_, Frame::Sequence { index })) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Locator {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let at = (mark.line(), mark.col() + 1);
        match event {
            Event::Scalar(value, ..) => match self.stack.last_mut() {
                Some((path, Frame::Mapping { key: key @ None })) => {
                    // A mapping's own position is its first key's.
                    if !path.is_empty() {
                        self.positions.entry(path.clone()).or_insert(at);
                    }
                    let full = if path.is_empty() {
                        value.clone()
                    } else {
                        format!("{path}.{value}")
                    };
                    self.positions.entry(full).or_insert(at);
                    *key = Some(value);
                }
                _ => {
                    if let Some(path) = self.value_path() {
                        self.positions.entry(path).or_insert(at);
                    }
                    self.advance();
                }
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.value_path().unwrap_or_default();
                if !path.is_empty() && matches!(event, Event::SequenceStart(..)) {
                    self.positions.entry(path.clone()).or_insert(at);
                }
                let frame = match event {
                    Event::MappingStart(..) => Frame::Mapping { key: None },
                    _ => Frame::Sequence { index: 0 },
                };
                self.stack.push((path, frame));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.advance();
            }
            Event::Alias(_) => self.advance(),
            _ => {}
        }
    }
}

/// Line and column (1-based) of every key and value path in `text`; empty when the text
/// does not parse (the YAML parser then reports the problem itself).
pub fn key_positions(text: &str) -> HashMap<String, (usize, usize)> {
    let mut locator = Locator {
        stack: Vec::new(),
        positions: HashMap::new(),
    };
    let mut parser = Parser::new_from_str(text);
    match parser.load(&mut locator, false) {
        Ok(()) => locator.positions,
        Err(_) => HashMap::new(),
    }
}

/// The position of `path`, or of its nearest ancestor that has one.
pub fn locate(positions: &HashMap<String, (usize, usize)>, path: &str) -> Option<(usize, usize)> {
    let mut path = path;
    loop {
        if let Some(at) = positions.get(path) {
            return Some(*at);
        }
        let cut = path.rfind(['.', '['])?;
        path = &path[..cut];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_lines_and_columns() {
        let text = "metrics:\n  listen: x\npipelines:\n  - name: a\n    sinks:\n      - name: s\n        batch_size: 0\n    tables: [p.*, q.r]\n";
        let positions = key_positions(text);
        assert_eq!(positions.get("metrics.listen"), Some(&(2, 3)));
        assert_eq!(positions.get("pipelines[0].name"), Some(&(4, 5)));
        assert_eq!(
            positions.get("pipelines[0].sinks[0].batch_size"),
            Some(&(7, 9))
        );
        assert_eq!(positions.get("pipelines[0].tables[1]"), Some(&(8, 19)));
        assert_eq!(
            locate(&positions, "pipelines[0].sinks[0].postgres.dsn"),
            Some((6, 9))
        );
    }
}
