//! Log output: `RUST_LOG` filtering (default `info`), ANSI colours only when stderr
//! is a terminal, and records from the `log` crate bridged into `tracing` — with
//! PostgreSQL's NOTICE messages (which `tokio-postgres` logs at INFO, e.g. "relation
//! … already exists, skipping" for every `CREATE … IF NOT EXISTS`) demoted to DEBUG.

use std::io::IsTerminal;

use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber writing to `writer`.
pub fn init<W>(writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    if log::set_boxed_logger(Box::new(Demote(tracing_log::LogTracer::new()))).is_ok() {
        // As `tracing_subscriber`'s own `init` does: `log` macros above the most
        // verbose enabled level cost nothing.
        use tracing::level_filters::LevelFilter;
        log::set_max_level(match LevelFilter::current() {
            LevelFilter::OFF => log::LevelFilter::Off,
            LevelFilter::ERROR => log::LevelFilter::Error,
            LevelFilter::WARN => log::LevelFilter::Warn,
            LevelFilter::INFO => log::LevelFilter::Info,
            LevelFilter::DEBUG => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        });
    }
}

/// Forwards `log` records to `tracing`, PostgreSQL notices one level down.
struct Demote(tracing_log::LogTracer);

impl Demote {
    fn level(meta: &log::Metadata<'_>) -> log::Level {
        if meta.target().starts_with("tokio_postgres") && meta.level() == log::Level::Info {
            log::Level::Debug
        } else {
            meta.level()
        }
    }
}

impl log::Log for Demote {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        let meta = log::Metadata::builder()
            .level(Self::level(meta))
            .target(meta.target())
            .build();
        self.0.enabled(&meta)
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = Self::level(record.metadata());
        self.0.log(
            &log::Record::builder()
                .args(*record.args())
                .level(level)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}
