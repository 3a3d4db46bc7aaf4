//! Batch files for tests and benchmarks: valid French mobile numbers in the forms ERPs write,
//! texts of 60 to 160 characters, and a share of invalid lines.

use std::io::Write;
use std::path::Path;

const WORDS: &[&str] = &[
    "Bonjour",
    "votre",
    "commande",
    "est",
    "prête",
    "rendez-vous",
    "demain",
    "à",
    "10h",
    "code",
    "livraison",
    "merci",
    "de",
    "confirmer",
    "agence",
    "Paris",
    "Lyon",
    "€",
    "facture",
    "disponible",
    "colis",
    "suivi",
];

/// The `i`-th valid mobile number, in E.164.
pub fn e164(i: u64) -> String {
    format!("+3361{:07}", i % 10_000_000)
}

/// The `i`-th number as an ERP might write it.
pub fn written_phone(i: u64) -> String {
    let n = i % 10_000_000;
    match i % 3 {
        0 => format!(
            "06 1{} {:02} {:02} {:02}",
            n / 1_000_000,
            (n / 10_000) % 100,
            (n / 100) % 100,
            n % 100
        ),
        1 => format!("+33 61{n:07}"),
        _ => format!("003361{n:07}"),
    }
}

/// A text of 60 to 160 characters, different for each `i`.
pub fn text(i: u64) -> String {
    let target = 60 + (i * 7919 % 101) as usize;
    let mut s = format!("#{i} ");
    let mut k = i;
    while s.chars().count() < target {
        k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push_str(WORDS[(k >> 33) as usize % WORDS.len()]);
        s.push(' ');
    }
    s.chars().take(target).collect::<String>().trim_end().to_string()
}

/// Writes a `lines`-line batch where every `invalid_every`-th line is invalid (0: none).
/// Returns the number of lines that should be accepted.
pub fn write_batch(path: &Path, lines: u64, invalid_every: u64) -> std::io::Result<u64> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(out, "phone;message;ref")?;
    let mut valid = 0;
    for i in 0..lines {
        if invalid_every > 0 && i % invalid_every == invalid_every - 1 {
            if (i / invalid_every) % 2 == 0 {
                writeln!(out, "12345;{};r{i}", text(i))?;
            } else {
                writeln!(out, "{};;r{i}", written_phone(i))?;
            }
        } else {
            writeln!(out, "{};\"{}\";r{i}", written_phone(i), text(i).replace('"', "\"\""))?;
            valid += 1;
        }
    }
    out.flush()?;
    Ok(valid)
}
