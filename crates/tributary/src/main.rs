//! The `tributary` binary: `serve` runs the server; `sources`, `sql` and
//! `destinations` are clients of the admin API. Thin by design: the server lives in
//! the `tributary-server` library.

mod cli;
mod datadir;
mod logging;

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the warehouse loader and ingest allocate
/// and free many small values per event, and glibc spent about half of the
/// loader's CPU in malloc/free (chunk consolidation on large frees).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc v3).
const MI_OPTION_PURGE_DELAY: i32 = 15;

#[allow(unsafe_code)]
unsafe extern "C" {
    /// mimalloc's option setter (linked from the static mimalloc the allocator uses).
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

/// Freed memory goes back to the OS after 100 ms instead of mimalloc v3's 1 s: under
/// a warehouse backlog every batch's rows are freed at once, and holding them a
/// second kept ~25 MiB more resident (issue #15: 136 → 114 MiB at the same load).
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn bound_allocator_retention() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` only stores an integer option, is thread-safe in
        // mimalloc, and is called with a valid option index of the linked version.
        #[allow(unsafe_code)]
        unsafe {
            mi_option_set(MI_OPTION_PURGE_DELAY, 100)
        };
    }
}

#[derive(Parser)]
#[command(
    name = "tributary",
    version,
    about = "Self-hosted, Segment-compatible customer-event pipeline"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults: ./tributary-data, 127.0.0.1:8088).
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides config and TRIBUTARY_DATA_DIR).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Listen address, IP:PORT or HOST:PORT such as localhost:8088 (overrides
        /// config and TRIBUTARY_LISTEN).
        #[arg(long, value_parser = tributary_server::config::resolve_listen)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Manage sources.
    Sources {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        command: cli::SourcesCmd,
    },
    /// Run read-only SQL against the warehouse, e.g.
    /// `tributary sql "select * from activecampaign.email_delivered"`.
    Sql {
        #[command(flatten)]
        conn: cli::Conn,
        /// The SQL statement.
        sql: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: cli::SqlFormat,
    },
    /// Manage destinations (webhook, segment, activecampaign).
    Destinations {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        command: cli::DestinationsCmd,
    },
    /// Reports computed from the warehouse, e.g. `tributary report email SRC`.
    Report {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        command: cli::ReportCmd,
    },
}

fn main() -> std::process::ExitCode {
    bound_allocator_retention();
    let _ = rustls::crypto::ring::default_provider().install_default();
    logging::init(|| LossyStderr);
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tributary: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match args.command {
            Command::Serve {
                config,
                data_dir,
                listen,
            } => serve(config, data_dir, listen).await,
            Command::Sources { conn, command } => cli::sources(conn, command).await,
            Command::Destinations { conn, command } => cli::destinations(conn, command).await,
            Command::Sql { conn, sql, format } => cli::sql(conn, sql, format).await,
            Command::Report { conn, command } => cli::report(conn, command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tributary: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Stderr for logs that never fails: when stderr points at a full disk, a log line is
/// dropped instead of the logger's fallback `eprintln!` panicking the request task.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config = tributary_server::Config::load(config.as_deref(), &env)?;
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    if let Some(l) = listen {
        config.listen = l;
    }
    // Held until the server has shut down; the kernel releases it on any exit.
    let _lock = datadir::lock(&config.data_dir)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    tributary_server::serve(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
