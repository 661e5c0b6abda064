use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = posthorn::cli::Cli::parse();
    match posthorn::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => posthorn::cli::exit_code(&err),
    }
}
