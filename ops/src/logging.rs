//! Structured logs with `tracing`: text for people, JSON for log pipelines.

/// `text` or `json`.
pub fn parse_format(s: &str) -> Result<bool, String> {
    match s {
        "text" => Ok(false),
        "json" => Ok(true),
        other => Err(format!("{other:?} is not a log format; expected text or json")),
    }
}

/// Checks a level filter (tracing `EnvFilter` syntax).
pub fn check_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level).map(|_| ()).map_err(|e| format!("{level:?} is not a level filter: {e}"))
}

/// Installs the global subscriber: `RUST_LOG` wins over `level`; colours only on a terminal.
pub fn init(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
