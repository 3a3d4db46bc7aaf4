use clap::Parser;

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
