// The lead replaces this file; `cli` is wired in here so its unit tests build and run.
#[allow(dead_code)]
mod cli;

fn main() {}
