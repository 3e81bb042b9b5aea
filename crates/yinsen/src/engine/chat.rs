//! TEMPORARY placeholder until the chat-template module lands (same API).
use crate::error::{Error, Result};
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}
impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}
pub fn render_chat(_t: Option<&str>, _m: &[ChatMessage], _g: bool, _b: &str, _e: &str) -> Result<String> {
    Err(Error::Unsupported("chat templates not merged yet".into()))
}
