//! How the command line shows answers. It exists so that every subcommand prints the same way:
//! aligned tables for people by default, and with `--json` the server's JSON unchanged, so that
//! scripts can rely on the API's documented shapes instead of on the table layout.

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::Value;

/// Writes one line on standard output. When the reader has gone away (`postroom tail | head`),
/// the process ends quietly with success instead of panicking as `println!` would, because the
/// reader has all it wanted; any other write failure ends it with status 1.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// `println!` for the client subcommands, through [`line`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// A table with a header row, printed with its columns aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds one row; missing cells are left blank.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, columns separated by two spaces. The last column is
    /// not padded, so that lines carry no trailing blanks.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().take(columns).enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table on standard output.
    pub fn print(&self) {
        let text = self.render();
        out!("{}", text.trim_end_matches('\n'));
    }
}

/// Prints a JSON value on one line or, for people, pretty-printed.
pub fn print_json(v: &Value) {
    out!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Prints an object as a two-column FIELD/VALUE table, in the order the server sent its fields.
pub fn print_object(v: &Value) {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    if let Some(map) = v.as_object() {
        for (k, val) in map {
            t.row(vec![k.clone(), cell(val)]);
        }
    }
    t.print();
}

/// A JSON value as one table cell: strings without quotes, `null` as blank, everything else as
/// compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The cell for `pointer` inside `v` (blank when it is absent).
pub fn at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer).map(cell).unwrap_or_default()
}

/// The items of a listing answer (`{"items": [...]}`), empty when there are none.
pub fn items(v: &Value) -> &[Value] {
    v.get("items")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// One event of a listing or a pull (`{"event": {...}, "payload": ...}`) as a single line for
/// `tail`: time, type, key, sequence, id and the compact payload.
pub fn event_line(item: &Value) -> String {
    let e = item.get("event").unwrap_or(&Value::Null);
    let payload = item.get("payload").unwrap_or(&Value::Null);
    format!(
        "{}  {}  key={}  seq={}  {}  {}",
        at(e, "/received_at"),
        at(e, "/event_type"),
        at(e, "/key"),
        at(e, "/sequence"),
        at(e, "/id"),
        payload
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&["NAME", "N", "NOTE"]);
        t.row(vec!["long-name".into(), "1".into(), String::new()]);
        t.row(vec!["x".into(), "22".into(), "hé".into()]);
        assert_eq!(
            t.render(),
            "NAME       N   NOTE\nlong-name  1\nx          22  hé\n"
        );
    }

    #[test]
    fn cells_and_event_lines() {
        assert_eq!(cell(&json!(null)), "");
        assert_eq!(cell(&json!("s")), "s");
        assert_eq!(cell(&json!([1, "a"])), "[1,\"a\"]");
        let item = json!({"event": {"received_at": "T", "event_type": "msg", "key": "k",
            "sequence": 3, "id": "ID"}, "payload": {"a": [1, 2]}});
        assert_eq!(event_line(&item), "T  msg  key=k  seq=3  ID  {\"a\":[1,2]}");
    }
}
