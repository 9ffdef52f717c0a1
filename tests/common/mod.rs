//! Small helpers shared by the integration tests: writing input files and running prepare.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use dtrain::config::{self, Override, PrepareConfig};
use dtrain::data::prepare::{prepare, PrepareReport};

/// Writes `text` to `dir/name`, gzipped when the name ends in `.gz`.
pub fn write(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if name.ends_with(".gz") {
        let f = std::fs::File::create(&path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(text).unwrap();
        gz.finish().unwrap();
    } else {
        std::fs::write(&path, text).unwrap();
    }
    path
}

/// A prepare config from `key=value` overrides (as after `--set`).
pub fn config(sets: &[String]) -> dtrain::Result<PrepareConfig> {
    let o: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    config::load(None, &o)
}

/// Runs prepare on `labeled` (and `unlabeled`) files into `out` with extra `key=value` sets.
pub fn run(
    labeled: &[&Path],
    unlabeled: &[&Path],
    out: &Path,
    extra: &[&str],
) -> dtrain::Result<PrepareReport> {
    let list = |ps: &[&Path]| {
        format!(
            "[{}]",
            ps.iter().map(|p| format!("{:?}", p.display().to_string())).collect::<Vec<_>>().join(", ")
        )
    };
    let mut sets = vec![format!("output.dir={:?}", out.display().to_string())];
    if !labeled.is_empty() {
        sets.push(format!("input.labeled={}", list(labeled)));
    }
    if !unlabeled.is_empty() {
        sets.push(format!("input.unlabeled={}", list(unlabeled)));
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    prepare(&config(&sets)?, false)
}

/// A labeled TSV of `classes` classes with `per_class` distinct documents each; document j
/// of class c is `c{c} doc {j} words …`.
pub fn tsv(classes: usize, per_class: usize) -> String {
    let mut s = String::new();
    for j in 0..per_class {
        for c in 0..classes {
            s.push_str(&format!("class{c}\tc{c} doc {j} shared words here number {}\n", j * 31 + c));
        }
    }
    s
}

/// `lines` lines of 8 words; line i draws its words from topic `i mod topics.len()` (by a
/// fixed generator seeded with `seed`), so words co-occur only within their topic.
pub fn topic_lines<'a>(topics: &[&[&'a str]], lines: usize, seed: u64) -> Vec<Vec<&'a str>> {
    let mut x = seed;
    let mut next = |n: usize| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % n as u64) as usize
    };
    (0..lines)
        .map(|line| {
            let topic = topics[line % topics.len()];
            (0..8).map(|_| topic[next(topic.len())]).collect()
        })
        .collect()
}
