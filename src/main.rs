use clap::Parser;

/// mimalloc: the ingest pipeline allocates per line on several threads, where glibc's malloc
/// spent a quarter of the time (measured with perf during `make bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = smsdrop::cli::Cli::parse();
    match smsdrop::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smsdrop: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
