//! The message record: one accepted line of a batch, ready to send.

use serde::{Deserialize, Serialize};

/// How a message's text is coded on the air interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TextCoding {
    Gsm7,
    Ucs2,
}

impl TextCoding {
    pub fn as_str(self) -> &'static str {
        match self {
            TextCoding::Gsm7 => "gsm7",
            TextCoding::Ucs2 => "ucs2",
        }
    }
}

/// One accepted message: what is sent, to whom, from whom and when. The store keeps it sealed
/// inside its batch's chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Line of the batch where its record starts.
    pub line: u64,
    pub reference: String,
    /// E.164.
    pub phone: String,
    pub sender: String,
    pub text: String,
    pub coding: TextCoding,
    pub parts: u8,
    /// Unix seconds; `None` sends at once.
    pub send_at: Option<i64>,
}
