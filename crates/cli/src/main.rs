use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = berth_cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(berth_cli::run(cli)) {
        // `run` and `exec` end with their process's exit status.
        Ok(()) => ExitCode::from(berth_cli::run::exit_code()),
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}
