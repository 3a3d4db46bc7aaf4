//! How a batch file is written (delimiter, encoding, byte-order mark): its reply files are
//! written the same way.

use serde::{Deserialize, Serialize};

/// How a batch's reply files are written: the same way the batch came in (docs/reply-files.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyFormat {
    pub delimiter: u8,
    /// The WHATWG name of the batch's encoding.
    pub encoding: String,
    /// Whether the batch started with a byte-order mark (the reply files then do too).
    pub bom: bool,
}

impl Default for ReplyFormat {
    fn default() -> Self {
        ReplyFormat {
            delimiter: b';',
            encoding: "UTF-8".into(),
            bom: false,
        }
    }
}
