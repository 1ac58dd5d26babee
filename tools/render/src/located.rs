//! The gateway file as a JSON tree plus the line of every node, so an error found later (by
//! the filter's or the renderer's types) can say where in the file the field is.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use serde_saphyr::Spanned;

/// A YAML node with the lines of its children.
struct Node {
    value: Value,
    children: Vec<(Child, Spanned<Node>)>,
}

enum Child {
    Key(String),
    Index(usize),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

fn leaf(value: Value) -> Node {
    Node {
        value,
        children: Vec::new(),
    }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(leaf(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(leaf(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(leaf(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(leaf(Value::Number(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(leaf(Value::Number(v.into())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Number::from_f64(v)
            .map(|n| leaf(Value::Number(n)))
            .ok_or_else(|| E::custom("numbers must be finite"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(leaf(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(leaf(Value::String(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut children = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            children.push((Child::Index(children.len()), item));
        }
        let value = Value::Array(children.iter().map(|(_, n)| n.value.value.clone()).collect());
        Ok(Node { value, children })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut children = Vec::new();
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let item = map.next_value::<Spanned<Node>>()?;
            object.insert(key.clone(), item.value.value.clone());
            children.push((Child::Key(key), item));
        }
        Ok(Node {
            value: Value::Object(object),
            children,
        })
    }
}

/// The parsed file: its tree, and the line of each field path (`routes[0].methods`).
pub struct Located {
    pub value: Value,
    lines: HashMap<String, u64>,
}

fn collect(prefix: &str, node: &Node, lines: &mut HashMap<String, u64>) {
    for (child, spanned) in &node.children {
        let path = match child {
            Child::Key(k) if prefix.is_empty() => k.clone(),
            Child::Key(k) => format!("{prefix}.{k}"),
            Child::Index(i) => format!("{prefix}[{i}]"),
        };
        lines.insert(path.clone(), spanned.referenced.line());
        collect(&path, &spanned.value, lines);
    }
}

impl Located {
    pub fn parse(text: &str) -> Result<Self, String> {
        // YAML 1.2 booleans (`true`/`false` only): a route named `y` or `on` stays a string.
        let options = serde_saphyr::options! { strict_booleans: true };
        let root: Node = serde_saphyr::from_str_with_options(text, options).map_err(|e| e.to_string())?;
        let mut lines = HashMap::new();
        collect("", &root, &mut lines);
        Ok(Located {
            value: root.value,
            lines,
        })
    }

    /// The line of `path`, or of its nearest ancestor in the file.
    pub fn line(&self, path: &str) -> Option<u64> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = p.get(..cut)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_nested_fields() {
        let l = Located::parse("a: 1\nroutes:\n  - name: x\n    methods: [GET]\n  - {name: y, on: no}\n")
            .unwrap();
        assert_eq!(l.value["routes"][1]["name"], "y");
        assert_eq!(
            l.value["routes"][1]["on"], "no",
            "YAML 1.2: only true/false are booleans"
        );
        assert_eq!(l.line("a"), Some(1));
        assert_eq!(l.line("routes[0].methods"), Some(4));
        assert_eq!(l.line("routes[0].methods[0]"), Some(4));
        assert_eq!(l.line("routes[1].name"), Some(5));
        assert_eq!(l.line("routes[0].nope"), Some(3), "nearest ancestor");
        assert_eq!(l.line("zzz"), None);
        assert!(Located::parse("a: [").is_err());
    }
}
