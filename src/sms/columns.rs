//! Column names of a batch file and their aliases (docs/batch-format.md).

/// What a column of a batch means.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Column {
    Phone,
    Message,
    Sender,
    SendAt,
    Ref,
    /// Any other column: a variable for the tenant's template, by its lower-case name.
    Var(String),
}

impl Column {
    /// Reads a header cell (or a name in a tenant's `columns`), case-insensitively.
    pub fn from_header(name: &str) -> Column {
        let name = name.trim().trim_start_matches('\u{feff}').trim().to_lowercase();
        match name.as_str() {
            "phone" | "to" | "recipient" | "msisdn" | "mobile" | "number" | "numero" => Column::Phone,
            "message" | "text" | "body" | "sms" => Column::Message,
            "sender" | "from" | "originator" => Column::Sender,
            "send_at" | "schedule" | "date" => Column::SendAt,
            "ref" | "reference" | "id" | "client_ref" => Column::Ref,
            _ => Column::Var(name),
        }
    }

    /// The canonical name, under which templates can also use the column.
    pub fn name(&self) -> &str {
        match self {
            Column::Phone => "phone",
            Column::Message => "message",
            Column::Sender => "sender",
            Column::SendAt => "send_at",
            Column::Ref => "ref",
            Column::Var(v) => v,
        }
    }
}

/// Where each known column sits in a record.
#[derive(Debug, Clone, Default)]
pub struct ColumnMap {
    pub phone: Option<usize>,
    pub message: Option<usize>,
    pub sender: Option<usize>,
    pub send_at: Option<usize>,
    pub reference: Option<usize>,
    /// Every column by the name templates use for it: (name, index).
    pub vars: Vec<(String, usize)>,
    pub width: usize,
}

impl ColumnMap {
    /// Maps columns by position; the first column of each kind wins.
    pub fn new(columns: &[Column]) -> ColumnMap {
        let mut map = ColumnMap {
            width: columns.len(),
            ..ColumnMap::default()
        };
        for (i, c) in columns.iter().enumerate() {
            let slot = match c {
                Column::Phone => &mut map.phone,
                Column::Message => &mut map.message,
                Column::Sender => &mut map.sender,
                Column::SendAt => &mut map.send_at,
                Column::Ref => &mut map.reference,
                Column::Var(_) => {
                    map.vars.push((c.name().to_string(), i));
                    continue;
                }
            };
            if slot.is_none() {
                *slot = Some(i);
                map.vars.push((c.name().to_string(), i));
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_case_insensitive() {
        for (name, col) in [
            ("Phone", Column::Phone),
            ("MSISDN", Column::Phone),
            (" numero ", Column::Phone),
            ("\u{feff}to", Column::Phone),
            ("SMS", Column::Message),
            ("Originator", Column::Sender),
            ("schedule", Column::SendAt),
            ("Client_Ref", Column::Ref),
            ("Name", Column::Var("name".into())),
        ] {
            assert_eq!(Column::from_header(name), col, "{name}");
        }
    }

    #[test]
    fn first_column_of_a_kind_wins() {
        let m = ColumnMap::new(&[Column::Phone, Column::Var("x".into()), Column::Phone, Column::Message]);
        assert_eq!(m.phone, Some(0));
        assert_eq!(m.message, Some(3));
        assert_eq!(m.width, 4);
        assert!(m.vars.contains(&("x".into(), 1)));
    }
}
