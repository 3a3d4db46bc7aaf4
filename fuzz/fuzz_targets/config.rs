//! The configuration: any text is either a configuration or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|source: &str| {
    let _ = smsdrop::config::Config::parse(std::path::Path::new("/nonexistent/fuzz.toml"), source);
});
