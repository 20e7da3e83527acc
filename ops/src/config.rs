//! Layered configuration: built-in defaults, a TOML file, environment variables, flags.
//!
//! A process declares its settings with [`settings!`](crate::settings), which gives each one its
//! file key, its variable and its flag, and a reference table for the docs. Validation lives
//! with each process; it collects every problem as a [`ConfigError`] naming the key.

use std::net::SocketAddr;
use std::path::Path;

/// Declares a process's settings: `Config` (file + defaults), `Overrides` (flags and
/// environment, for `clap`), `Config::apply` and `Config::reference`. The calling crate
/// depends on `serde` and `clap`.
#[macro_export]
macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $key:ident : $ty:ty = $default:expr, env $env:literal; )*) => {
        /// Settings as read from defaults, file, environment and flags; see `Config::validate`.
        #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $key: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $key: $default, )* }
            }
        }

        /// Command-line flags and environment variables; each overrides its file key.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct Overrides {
            $( $(#[doc = $doc])* #[arg(long, env = $env, value_name = stringify!($ty))] pub $key: Option<$ty>, )*
        }

        impl Config {
            /// Puts flags and environment variables over the file's values.
            pub fn apply(&mut self, o: Overrides) {
                $( if let Some(v) = o.$key { self.$key = v; } )*
            }

            /// Every setting: (file key, environment variable, default, description), for the
            /// documentation tables.
            pub fn reference() -> Vec<(&'static str, &'static str, String, String)> {
                let d = Config::default();
                vec![ $( (stringify!($key), $env, format!("{:?}", d.$key), [$($doc.trim()),*].join(" ")), )* ]
            }
        }
    };
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

/// Every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn single(key: &str, problem: String) -> ConfigErrors {
        ConfigErrors(vec![ConfigError { key: key.into(), problem }])
    }
}

/// Collects problems while a process validates its settings.
#[derive(Default)]
pub struct Problems(pub Vec<ConfigError>);

impl Problems {
    pub fn add(&mut self, key: &str, problem: impl Into<String>) {
        self.0.push(ConfigError { key: key.into(), problem: problem.into() });
    }

    /// `Ok(value)` with the value parsed, or records the problem under `key`.
    pub fn check<T>(&mut self, key: &str, r: Result<T, String>) -> Option<T> {
        r.map_err(|p| self.add(key, p)).ok()
    }

    pub fn into_result(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

/// Reads a TOML file of settings (unknown keys are errors), or the defaults without a file.
pub fn load_file<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigErrors> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigErrors::single("config", format!("cannot read {}: {e}", path.display())))?;
            from_toml(&text).map_err(|e| ConfigErrors::single("config", format!("{}: {e}", path.display())))
        }
        None => Ok(T::default()),
    }
}

/// Refuses environment variables that start with `prefix` but name no setting: a misspelt
/// variable would otherwise be ignored without a word (the file refuses unknown keys the same
/// way). `extra` are the process's other variables with that prefix (e.g. its CONFIG).
pub fn check_env(prefix: &str, reference: &[(&'static str, &'static str, String, String)], extra: &[&str]) -> Result<(), ConfigErrors> {
    let unknown: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with(prefix) && !reference.iter().any(|r| r.1 == k) && !extra.contains(&k.as_str()))
        .collect();
    match unknown.as_slice() {
        [] => Ok(()),
        _ => Err(ConfigErrors(
            unknown
                .into_iter()
                .map(|k| ConfigError { key: k, problem: "no such setting (see the configuration table in the README)".into() })
                .collect(),
        )),
    }
}

pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an address; expected IP:PORT such as 127.0.0.1:1883 (port 0 picks one)"))
}

/// An address, or `None` for the empty string (a disabled listener).
pub fn parse_optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_addr(s).map(Some)
    }
}

/// Checks values that must be positive; one problem per zero.
pub fn require_positive(problems: &mut Problems, values: &[(&str, u64)]) {
    for (key, v) in values {
        if *v == 0 {
            problems.add(key, "must be greater than 0");
        }
    }
}

/// The documentation table of a `Config::reference()`: one row per setting, as the README
/// shows it (a test compares the two).
pub fn reference_rows(reference: &[(&'static str, &'static str, String, String)]) -> Vec<String> {
    reference
        .iter()
        .map(|(key, env, default, doc)| {
            format!("| `{key}` | `{env}` | `--{}` | `{}` | {doc} |", key.replace('_', "-"), default.trim_matches('"'))
        })
        .collect()
}

/// Rows of `reference_rows` missing from (or out of date in) `doc`.
pub fn undocumented(doc: &str, reference: &[(&'static str, &'static str, String, String)]) -> Vec<String> {
    reference_rows(reference).into_iter().filter(|row| !doc.contains(row.as_str())).collect()
}
