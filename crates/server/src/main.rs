//! `berthd`, the Berth daemon. Flags and subcommands follow containerd's.

use berth_server::config::{self, Config, DEFAULT_CONFIG_PATH};
use berth_server::{daemon, logging, plugins, publish};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "berthd",
    version,
    about = "berthd: a containerd-compatible container runtime daemon",
    long_about = "berthd serves containerd's gRPC API on a unix socket, so containerd's clients \
                  (ctr, nerdctl, the kubelet's CRI) can drive it. It reads containerd's \
                  config.toml (version 2) unchanged."
)]
struct Cli {
    /// Path to the configuration file.
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address of the gRPC socket (for `publish`: the daemon to publish to).
    #[arg(short, long, global = true)]
    address: Option<String>,
    /// Directory for persistent data.
    #[arg(long)]
    root: Option<String>,
    /// Directory for volatile data.
    #[arg(long)]
    state: Option<String>,
    /// Log level: trace, debug, info, warn, error, fatal, panic.
    #[arg(short = 'l', long)]
    log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Information on the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Publish an event read from stdin (a protobuf Any) to a running daemon.
    Publish {
        /// Namespace to publish to.
        #[arg(long, default_value = "")]
        namespace: String,
        /// Topic of the event.
        #[arg(long, default_value = "")]
        topic: String,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the default configuration, with every plugin's default section.
    Default,
    /// Print the effective configuration: the file with its imports over the defaults.
    Dump,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The logger may not be set up (or may be JSON): say it plainly on stderr.
            eprintln!("berthd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Config { action }) => {
            let registrations = plugins::all_registrations();
            let config = match action {
                ConfigAction::Default => Config::default(),
                ConfigAction::Dump => {
                    let loaded = load_config(cli.config.as_ref(), &registrations)?;
                    for warning in &loaded.warnings {
                        eprintln!("berthd: warning: {warning}");
                    }
                    loaded.config
                }
            };
            let mut config = config;
            berth_server::opt::normalise_section(&mut config);
            let defaults = registrations
                .iter()
                .map(|r| (r.uri(), r.default_config.clone()));
            print!("{}", config.with_plugin_defaults(defaults).to_toml());
            Ok(())
        }
        Some(Command::Publish { namespace, topic }) => {
            let address = cli
                .address
                .unwrap_or_else(|| config::DEFAULT_GRPC_ADDRESS.to_string());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(publish::publish(
                &address,
                &namespace,
                &topic,
                &mut std::io::stdin().lock(),
            ))
        }
        None => {
            let registrations = plugins::all_registrations();
            let loaded = load_config(cli.config.as_ref(), &registrations)?;
            drop(registrations);
            let mut config = loaded.config;
            if let Some(root) = cli.root {
                config.root = root;
            }
            if let Some(state) = cli.state {
                config.state = state;
            }
            if let Some(address) = cli.address {
                config.grpc.address = address;
            }
            if let Some(level) = cli.log_level {
                config.debug.level = level;
            }
            if let Some(format) = cli.log_format {
                config.debug.format = format;
            }
            config.validate()?;
            logging::init(&config.debug.level, &config.debug.format)?;
            for file in &loaded.files {
                tracing::info!(file = %file.display(), "loaded config");
            }
            for warning in &loaded.warnings {
                tracing::warn!("{warning}");
            }
            for warning in config.convert_cri_registry()? {
                tracing::warn!("{warning}");
            }
            daemon::run(config)
        }
    }
}

/// The default path may be missing (then the embedded defaults apply); a path given
/// with `--config` must exist.
fn load_config(
    path: Option<&PathBuf>,
    registrations: &[berth_plugin::Registration],
) -> anyhow::Result<config::Loaded> {
    let ids = plugins::plugin_ids(registrations);
    let (path, explicit) = match path {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    if !explicit && !path.exists() {
        return Ok(config::Loaded {
            config: Config::default(),
            files: Vec::new(),
            warnings: Vec::new(),
        });
    }
    Ok(Config::load(&path, &ids)?)
}
