//! `shoal`: the command-line tool.
//!
//! ```text
//! shoal config            # the effective configuration (file + SHOAL_* overrides), as YAML,
//!                         # the password of redis.url hidden
//! shoal clean [-n NS]     # delete every key of a namespace (default: shoal.namespace)
//! ```
//!
//! Both read the configuration as a program's `shoal::init()` does; an invalid configuration is
//! reported with its key and origin and a non-zero exit. `clean` needs `redis.url` (an embedded
//! store lives and dies with its program, so there is nothing to clean there).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal::Config;
use shoal_core::store::{Store, StoreSettings};

#[derive(Parser)]
#[command(name = "shoal", version, about = "shoal's command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective configuration as YAML (and check it), the password of redis.url
    /// hidden.
    Config,
    /// Delete every key of a namespace from the configured Redis.
    Clean {
        /// The namespace (default: shoal.namespace).
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> shoal::Result<()> {
    let config = Config::load()?;
    match command {
        Command::Config => {
            // Redacted: the output lands in terminals, logs and bug reports.
            print!("{}", config.to_redacted_yaml());
            Ok(())
        }
        Command::Clean { namespace } => {
            let mut config = config;
            if let Some(namespace) = namespace {
                config.shoal.namespace = namespace;
                config.validate()?;
            }
            let Some(url) = config.redis.url.clone() else {
                return Err(shoal::Error::Config {
                    origin: "configuration".into(),
                    key: "redis.url".into(),
                    reason: "not set: the embedded store is private to each program and stops \
                             with it, so there is nothing to clean; set redis.url \
                             (SHOAL_REDIS_URL) to clean a shared Redis"
                        .into(),
                });
            };
            let store = Store::connect(&url, StoreSettings::from_config(&config))?;
            let deleted = store.clean_namespace()?;
            println!(
                "deleted {deleted} keys of namespace {} from {}",
                config.shoal.namespace,
                store.display_url()
            );
            Ok(())
        }
    }
}
