//! `berthd`, the Berth daemon. Flags and subcommands follow containerd's.

use berth_server::config::{self, Config, DEFAULT_CONFIG_PATH};
use berth_server::{daemon, logging, plugins, publish};
use std::path::PathBuf;
use std::process::ExitCode;

// The command line is parsed by hand rather than with clap: berthd has a handful of flags,
// and clap's builder and parser were among the largest pieces of code every daemon start
// ran (and kept resident).

const USAGE: &str = "\
berthd: a containerd-compatible container runtime daemon

berthd serves containerd's gRPC API on a unix socket, so containerd's clients (ctr,
nerdctl, the kubelet's CRI) can drive it. It reads containerd's config.toml (version 2)
unchanged.

Usage: berthd [OPTIONS] [COMMAND]

Commands:
  config   Information on the configuration
             config default   Print the default configuration, with every plugin's
                              default section
             config dump      Print the effective configuration: the file with its
                              imports over the defaults
  publish  Publish an event read from stdin (a protobuf Any) to a running daemon
             --namespace <NS>   Namespace to publish to
             --topic <TOPIC>    Topic of the event

Options:
  -c, --config <PATH>          Path to the configuration file
  -a, --address <ADDRESS>      Address of the gRPC socket (for `publish`: the daemon to
                               publish to)
      --root <ROOT>            Directory for persistent data
      --state <STATE>          Directory for volatile data
  -l, --log-level <LOG_LEVEL>  Log level: trace, debug, info, warn, error, fatal, panic
      --log-format <FORMAT>    Log format: text or json
  -h, --help                   Print help
  -V, --version                Print version
";

#[derive(Default)]
struct Cli {
    config: Option<PathBuf>,
    address: Option<String>,
    root: Option<String>,
    state: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    command: Option<Command>,
}

enum Command {
    Config { action: ConfigAction },
    Publish { namespace: String, topic: String },
}

enum ConfigAction {
    Default,
    Dump,
}

/// What the command line asks for: run, or print something and exit.
enum Parsed {
    Run(Cli),
    Help,
    Version,
}

/// Parses containerd-style flags: `-c PATH`, `--config PATH` or `--config=PATH`, in any
/// position (the global ones may follow the subcommand, as with containerd).
fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut cli = Cli::default();
    let mut words: Vec<String> = Vec::new();
    let mut namespace = None;
    let mut topic = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            words.extend(args.by_ref());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            words.push(arg);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            _ => {}
        }
        let slot = match name.as_str() {
            "-c" | "--config" => None,
            "-a" | "--address" => Some(&mut cli.address),
            "--root" => Some(&mut cli.root),
            "--state" => Some(&mut cli.state),
            "-l" | "--log-level" => Some(&mut cli.log_level),
            "--log-format" => Some(&mut cli.log_format),
            "--namespace" => Some(&mut namespace),
            "--topic" => Some(&mut topic),
            _ => return Err(format!("unexpected argument '{arg}' found")),
        };
        let value = match inline {
            Some(value) => value,
            None => args.next().ok_or_else(|| {
                format!("a value is required for '{name} <VALUE>' but none was supplied")
            })?,
        };
        match slot {
            Some(slot) => *slot = Some(value),
            None => cli.config = Some(PathBuf::from(value)),
        }
    }
    let mut words = words.into_iter();
    cli.command = match words.next().as_deref() {
        None => None,
        Some("help") => return Ok(Parsed::Help),
        Some("config") => {
            let action = match words.next().as_deref() {
                Some("default") => ConfigAction::Default,
                Some("dump") => ConfigAction::Dump,
                Some(other) => return Err(format!("unrecognized subcommand 'config {other}'")),
                None => return Err("'config' requires a subcommand: default or dump".into()),
            };
            Some(Command::Config { action })
        }
        Some("publish") => Some(Command::Publish {
            namespace: namespace.take().unwrap_or_default(),
            topic: topic.take().unwrap_or_default(),
        }),
        Some(other) => return Err(format!("unrecognized subcommand '{other}'")),
    };
    if let Some(extra) = words.next() {
        return Err(format!("unexpected argument '{extra}' found"));
    }
    if namespace.is_some() || topic.is_some() {
        return Err("--namespace and --topic belong to the publish command".into());
    }
    Ok(Parsed::Run(cli))
}

fn main() -> ExitCode {
    let cli = match parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("berthd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "error: {e}\n\nUsage: berthd [OPTIONS] [COMMAND]\n\nFor more information, try '--help'."
            );
            return ExitCode::from(2);
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(|a| a.to_string()))
    }

    fn run_args(args: &[&str]) -> Cli {
        match parse_args(args) {
            Ok(Parsed::Run(cli)) => cli,
            Ok(_) => panic!("{args:?}: not a run"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn flags_in_every_form_and_position() {
        let cli = run_args(&[
            "-c",
            "/a.toml",
            "--root=/r",
            "--state",
            "/s",
            "-l",
            "debug",
            "--log-format=json",
        ]);
        assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("/a.toml")));
        assert_eq!(cli.root.as_deref(), Some("/r"));
        assert_eq!(cli.state.as_deref(), Some("/s"));
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        assert_eq!(cli.log_format.as_deref(), Some("json"));
        assert!(cli.command.is_none());

        let cli = run_args(&["config", "dump", "--config", "/b.toml"]);
        assert!(matches!(
            cli.command,
            Some(Command::Config {
                action: ConfigAction::Dump
            })
        ));
        assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("/b.toml")));
        assert!(matches!(
            run_args(&["config", "default"]).command,
            Some(Command::Config {
                action: ConfigAction::Default
            })
        ));

        let cli = run_args(&[
            "--address",
            "/x.sock",
            "publish",
            "--namespace",
            "n",
            "--topic=/t",
        ]);
        assert_eq!(cli.address.as_deref(), Some("/x.sock"));
        match cli.command {
            Some(Command::Publish { namespace, topic }) => {
                assert_eq!((namespace.as_str(), topic.as_str()), ("n", "/t"));
            }
            _ => panic!("not publish"),
        }
    }

    #[test]
    fn help_version_and_mistakes() {
        assert!(matches!(parse_args(&["--version"]), Ok(Parsed::Version)));
        assert!(matches!(parse_args(&["-V"]), Ok(Parsed::Version)));
        assert!(matches!(parse_args(&["-h"]), Ok(Parsed::Help)));
        assert!(matches!(parse_args(&["help"]), Ok(Parsed::Help)));
        for bad in [
            &["--bogus"][..],
            &["--config"],
            &["config"],
            &["config", "nope"],
            &["serve"],
            &["config", "dump", "extra"],
            &["--topic", "/t"],
        ] {
            assert!(parse_args(bad).is_err(), "{bad:?}");
        }
    }
}
