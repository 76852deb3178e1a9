//! Admission benchmark: turnout's `/mutate` against a baseline webhook that answers "allowed"
//! without parsing, both served by turnout's own TLS transport, measured side by side in one run.
//!
//! ```text
//!  load generator runtime                     server runtime (--server-threads)
//!  N keep-alive HTTP/1.1 connections  ─TLS─▶  transport::serve ─▶ baseline: read body, constant answer
//!  (rustls + hyper client)            ─TLS─▶  transport::serve ─▶ turnout::webhook::Handler
//! ```
//!
//! Phases, alternated per round: closed loop (each connection sends its next review as soon as the
//! previous answer arrives) for the maximum reviews/s, then open loop at a fixed `--rate` for the
//! latency percentiles. Run with `cargo bench --bench admission` (options after `--`, see `--help`).
//! Results are printed, never asserted.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::Deployment;
use kube::core::admission::AdmissionReview;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

// The allocator of the `turnout` binary, so the servers here run as they do in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use turnout::admission;
use turnout::metrics::WebhookMetrics;
use turnout::tls::{CertStore, PairPaths};
use turnout::webhook::{Handler, transport};

/// Admission throughput and latency of turnout against a no-parse baseline on the same TLS stack.
#[derive(Debug, Parser)]
#[command(
    name = "admission",
    after_help = "Example:\n  cargo bench --bench admission -- --duration 10s --connections 4 --rate 1000"
)]
struct Args {
    /// Measured length of each phase.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up at the start of each phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Keep-alive HTTP/1.1 connections to each server (one request in flight on each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: u32,
    /// Reviews per second of the open-loop (latency) phase, spread evenly over the connections.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Rounds of baseline/turnout phases; the summary merges all rounds.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Worker threads of the servers' tokio runtime (both servers share it).
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Worker threads of the load generator's tokio runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Install turnout's JSON log subscriber (level info) writing to a sink, so that the cost of
    /// formatting one log line per review is included (writing it out is not).
    #[arg(long)]
    logs: bool,
    /// Print the AdmissionReview body that is sent and exit (e.g. to feed it to `turnout mutate`).
    #[arg(long)]
    print_body: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The baseline's answer: constant, whatever the request.
const ALLOWED: &[u8] =
    br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":true}}"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.logs {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    }
    let body = Bytes::from(review_body());
    if args.print_body {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads)
        .thread_name("server")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name("client")
        .enable_all()
        .build()?;

    let certs = tempfile::tempdir()?;
    let bundle = turnout::certs::generate(&["127.0.0.1".to_owned()])?;
    turnout::certs::write(certs.path(), &bundle, false)?;
    let store = CertStore::load(PairPaths {
        cert: certs.path().join("tls.crt"),
        key: certs.path().join("tls.key"),
    })?;
    let tls = store.server_config()?;
    let (baseline_addr, turnout_addr) = server_rt.block_on(start_servers(tls))?;
    let connector = client_connector(&bundle.ca_pem)?;

    let result = client_rt.block_on(run(&args, body, connector, baseline_addr, turnout_addr));
    client_rt.shutdown_timeout(Duration::from_secs(1));
    server_rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Starts both servers on 127.0.0.1, each with turnout's transport and the same TLS configuration.
async fn start_servers(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let localhost = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let never = std::future::pending::<()>;

    let baseline = TcpListener::bind(localhost).await?;
    let baseline_addr = baseline.local_addr()?;
    tokio::spawn(transport::serve(
        baseline,
        tls.clone(),
        |req: Request<Incoming>| async move {
            // Read the whole body, as any webhook must, but do not look at it.
            let _ = req.into_body().collect().await;
            let mut r = Response::new(Full::new(Bytes::from_static(ALLOWED)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        },
        transport::Limits::default(),
        never(),
    ));

    let mut registry = Registry::default();
    let handler = Arc::new(Handler {
        config: admission::Config {
            agent_username: Some("system:serviceaccount:turnout-system:turnout".to_owned()),
        },
        metrics: Arc::new(WebhookMetrics::register(&mut registry)),
        max_body_bytes: 4 * 1024 * 1024,
    });
    let turnout = TcpListener::bind(localhost).await?;
    let turnout_addr = turnout.local_addr()?;
    tokio::spawn(transport::serve(
        turnout,
        tls,
        move |req| handler.clone().handle(req),
        transport::Limits::default(),
        never(),
    ));
    Ok((baseline_addr, turnout_addr))
}

fn client_connector(ca_pem: &str) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One keep-alive HTTP/1.1 connection over TLS.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Connects and returns the connection with a description of the negotiated TLS session.
    async fn open(addr: SocketAddr, connector: &TlsConnector) -> anyhow::Result<(Self, String)> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await?;
        let session = tls.get_ref().1;
        let described = format!(
            "{} {}, ALPN {}",
            session
                .protocol_version()
                .map_or("?".to_owned(), |v| format!("{v:?}").replace("TLSv1_", "TLS 1.")),
            session
                .negotiated_cipher_suite()
                .map_or("?".to_owned(), |s| format!("{:?}", s.suite())),
            session
                .alpn_protocol()
                .map_or("none".to_owned(), |p| String::from_utf8_lossy(p).into_owned()),
        );
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((Self { sender }, described))
    }

    /// Sends one review and reads the whole answer.
    async fn review(&mut self, body: &Bytes) -> anyhow::Result<Bytes> {
        self.sender.ready().await?;
        let req = Request::post("/mutate?timeout=10s")
            .header(header::HOST, "127.0.0.1")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, */*")
            .body(Full::new(body.clone()))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let answer = resp.into_body().collect().await?.to_bytes();
        ensure!(
            status == StatusCode::OK,
            "HTTP {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(answer)
    }
}

async fn open_all(addr: SocketAddr, connector: &TlsConnector, n: u32) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(Conn::open(addr, connector).await?.0);
    }
    Ok(conns)
}

/// What one phase measured.
#[derive(Default)]
struct Phase {
    /// Answers received within the measured window.
    completed: u64,
    /// Length of the measured window, in seconds.
    seconds: f64,
    /// Latencies in µs: open loop, from the scheduled send time to the whole answer (so waiting for a
    /// busy connection or a late client counts); closed loop, from the send.
    latency_us: Vec<u64>,
    /// Open loop: from the actual send to the whole answer, in µs.
    service_us: Vec<u64>,
    /// Open loop: how late the request was sent after its scheduled time, in µs.
    late_us: Vec<u64>,
    /// Closed loop: CPU time of the server and client threads during the measured window, in ns.
    cpu_ns: [u64; 2],
}

impl Phase {
    fn merge(&mut self, other: &Phase) {
        self.completed += other.completed;
        self.seconds += other.seconds;
        self.latency_us.extend_from_slice(&other.latency_us);
        self.service_us.extend_from_slice(&other.service_us);
        self.late_us.extend_from_slice(&other.late_us);
        self.cpu_ns[0] += other.cpu_ns[0];
        self.cpu_ns[1] += other.cpu_ns[1];
    }

    fn rate(&self) -> f64 {
        self.completed as f64 / self.seconds
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Closed loop: every connection sends its next review as soon as it has the previous answer.
async fn closed_loop(addr: SocketAddr, connector: &TlsConnector, body: &Bytes, args: &Args) -> anyhow::Result<Phase> {
    let conns = open_all(addr, connector, args.connections).await?;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut phase = Phase::default();
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    conn.review(&body).await?;
                    let done = Instant::now();
                    if done >= measure_from && done <= end {
                        phase.completed += 1;
                        phase.latency_us.push(micros(done - sent));
                    }
                }
                anyhow::Ok(phase)
            })
        })
        .collect();
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = cpu_ns();
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = cpu_ns();
    let mut total = Phase::default();
    for task in tasks {
        total.merge(&task.await??);
    }
    total.seconds = args.duration.as_secs_f64();
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        total.cpu_ns = [after[0] - before[0].min(after[0]), after[1] - before[1].min(after[1])];
    }
    Ok(total)
}

/// CPU time used so far by the threads of this process, in ns, summed by thread name: the servers'
/// runtime ("server") and the load generator's ("client"). `None` where Linux's
/// `/proc/self/task/*/schedstat` is not available.
fn cpu_ns() -> Option<[u64; 2]> {
    let mut sums = [0u64; 2];
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = entry.ok()?.path();
        let slot = match std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() {
            "server" => 0,
            "client" => 1,
            _ => continue,
        };
        // A thread may have ended since the directory was listed.
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        sums[slot] += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(sums)
}

/// Open loop: reviews are scheduled at a fixed rate and dealt round-robin to the connections, each of
/// which sends its reviews in order. Latency runs from the scheduled time, so a review that waits for
/// its connection, or for a client thread, counts that wait (no coordinated omission).
///
/// The schedule is kept by a plain thread with `std::thread::sleep` (sub-100 µs precision on Linux)
/// rather than a tokio interval, whose 1 ms timer granularity would add up to a millisecond of the
/// client's own lateness to every measurement.
async fn open_loop(addr: SocketAddr, connector: &TlsConnector, body: &Bytes, args: &Args) -> anyhow::Result<Phase> {
    let conns = open_all(addr, connector, args.connections).await?;
    let slot = Duration::from_secs(1) / args.rate;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut queues = Vec::new();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            queues.push(tx);
            let body = body.clone();
            tokio::spawn(async move {
                let mut phase = Phase::default();
                while let Some(scheduled) = rx.recv().await {
                    let sent = Instant::now();
                    conn.review(&body).await?;
                    let done = Instant::now();
                    if scheduled >= measure_from {
                        phase.completed += 1;
                        phase.latency_us.push(micros(done - scheduled));
                        phase.service_us.push(micros(done - sent));
                        phase.late_us.push(micros(sent.saturating_duration_since(scheduled)));
                    }
                }
                anyhow::Ok(phase)
            })
        })
        .collect();
    let pacer = std::thread::Builder::new().name("pacer".to_owned()).spawn(move || {
        for k in 0u32.. {
            let scheduled = start + slot * k;
            if scheduled >= end {
                break;
            }
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            let queue = &queues[k as usize % queues.len()];
            if queue.send(scheduled).is_err() {
                break; // the connection failed; its task reports why
            }
        }
    })?;
    let mut total = Phase::default();
    for task in tasks {
        total.merge(&task.await??);
    }
    pacer.join().map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    total.seconds = args.duration.as_secs_f64();
    Ok(total)
}

/// Percentile `p` (0..=100) of `sorted`, in ms.
fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

struct Row {
    max: Phase,
    fixed: Phase,
}

fn print_row(label: &str, server: &str, row: &mut Row) {
    row.fixed.latency_us.sort_unstable();
    let l = &row.fixed.latency_us;
    println!(
        "{label:<6} {server:<9} {:>13.0} {:>7.1} {:>7.1}   {:>8.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
        row.max.rate(),
        row.max.cpu_ns[0] as f64 / 1000.0 / row.max.completed.max(1) as f64,
        row.max.cpu_ns[1] as f64 / 1000.0 / row.max.completed.max(1) as f64,
        row.fixed.rate(),
        pct(l, 50.0),
        pct(l, 90.0),
        pct(l, 99.0),
        pct(l, 100.0),
    );
}

async fn run(
    args: &Args,
    body: Bytes,
    connector: TlsConnector,
    baseline: SocketAddr,
    turnout: SocketAddr,
) -> anyhow::Result<()> {
    // Check once that both servers answer as expected before measuring anything.
    let (mut conn, session) = Conn::open(baseline, &connector).await?;
    let answer: Value = serde_json::from_slice(&conn.review(&body).await?)?;
    ensure!(
        answer["response"]["allowed"] == json!(true),
        "the baseline did not allow: {answer}"
    );
    let (mut conn, _) = Conn::open(turnout, &connector).await?;
    let answer: Value = serde_json::from_slice(&conn.review(&body).await?)?;
    let response = &answer["response"];
    ensure!(response["allowed"] == json!(true), "turnout did not allow: {answer}");
    ensure!(
        response["uid"] == json!(REVIEW_UID),
        "turnout answered another uid: {answer}"
    );
    ensure!(
        response["patchType"] == json!("JSONPatch"),
        "turnout answered without a JSONPatch: {answer}"
    );
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().context("the patch is not a string")?)
        .context("the patch is not base64")?;
    let patch: Vec<Value> = serde_json::from_slice(&patch).context("the patch is not a JSON array")?;
    if patch.is_empty() {
        bail!("turnout's patch is empty: {answer}");
    }
    let paths: Vec<String> = patch
        .iter()
        .map(|op| {
            format!(
                "{} {}",
                op["op"].as_str().unwrap_or("?"),
                op["path"].as_str().unwrap_or("?")
            )
        })
        .collect();

    println!(
        "admission benchmark: body {} B (Deployment UPDATE), {} keep-alive HTTP/1.1 connections over {session}",
        body.len(),
        args.connections,
    );
    println!(
        "  {} per phase after {} warm-up, {} round(s); servers: {} tokio worker threads; load generator: {} worker threads in the same process; {} CPUs{}",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        args.rounds,
        args.server_threads,
        args.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if args.logs {
            "; JSON logs formatted to a sink"
        } else {
            "; no log subscriber"
        },
    );
    println!(
        "  check: baseline allowed; turnout allowed with a {}-operation JSONPatch: {}",
        patch.len(),
        paths.join(", ")
    );
    println!(
        "  answer sizes: baseline {} B, turnout {} B",
        ALLOWED.len(),
        serde_json::to_vec(&answer)?.len()
    );
    println!();
    println!(
        "                   closed loop: max  CPU µs/review   open loop at {}/s:\nround  server        reviews/s  server  client     done/s   p50 ms   p90 ms   p99 ms   max ms",
        args.rate
    );

    let mut all_baseline = Row {
        max: Phase::default(),
        fixed: Phase::default(),
    };
    let mut all_turnout = Row {
        max: Phase::default(),
        fixed: Phase::default(),
    };
    for round in 1..=args.rounds {
        let b_max = closed_loop(baseline, &connector, &body, args).await?;
        let t_max = closed_loop(turnout, &connector, &body, args).await?;
        let b_fixed = open_loop(baseline, &connector, &body, args).await?;
        let t_fixed = open_loop(turnout, &connector, &body, args).await?;
        for (all, max, fixed) in [
            (&mut all_baseline, &b_max, &b_fixed),
            (&mut all_turnout, &t_max, &t_fixed),
        ] {
            all.max.merge(max);
            all.fixed.merge(fixed);
        }
        let label = round.to_string();
        print_row(
            &label,
            "baseline",
            &mut Row {
                max: b_max,
                fixed: b_fixed,
            },
        );
        print_row(
            &label,
            "turnout",
            &mut Row {
                max: t_max,
                fixed: t_fixed,
            },
        );
    }
    if args.rounds > 1 {
        print_row("all", "baseline", &mut all_baseline);
        print_row("all", "turnout", &mut all_turnout);
    }

    all_turnout.fixed.latency_us.sort_unstable();
    let ratio = all_turnout.max.rate() / all_baseline.max.rate();
    let p99 = pct(&all_turnout.fixed.latency_us, 99.0);
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!();
    println!(
        "turnout / baseline throughput: {ratio:.2} (target >= 0.50: {})   turnout p99 at {}/s: {p99:.3} ms (target <= 2 ms: {})",
        verdict(ratio >= 0.5),
        args.rate,
        verdict(p99 <= 2.0),
    );
    let detail = |row: &mut Row| {
        let f = &mut row.fixed;
        f.service_us.sort_unstable();
        f.late_us.sort_unstable();
        format!(
            "send to answer p50 {:.3} p99 {:.3}, sent late p50 {:.3} p99 {:.3}",
            pct(&f.service_us, 50.0),
            pct(&f.service_us, 99.0),
            pct(&f.late_us, 50.0),
            pct(&f.late_us, 99.0)
        )
    };
    println!("at {}/s, ms: baseline {}", args.rate, detail(&mut all_baseline));
    println!("at {}/s, ms: turnout  {}", args.rate, detail(&mut all_turnout));
    for (name, row) in [("baseline", &mut all_baseline), ("turnout", &mut all_turnout)] {
        row.max.latency_us.sort_unstable();
        let l = &row.max.latency_us;
        println!(
            "closed-loop latency {name}: p50 {:.3}  p99 {:.3} ms",
            pct(l, 50.0),
            pct(l, 99.0)
        );
    }

    println!();
    breakdown(&body)?;
    Ok(())
}

/// Times turnout's admission steps on this thread alone, without TLS or HTTP, to show where a
/// review's cost goes. The steps mirror `admission::review`; the first line is the real thing.
fn breakdown(body: &[u8]) -> anyhow::Result<()> {
    let config = admission::Config {
        agent_username: Some("system:serviceaccount:turnout-system:turnout".to_owned()),
    };
    let review: AdmissionReview<Deployment> = serde_json::from_slice(body)?;
    let request = review.request.context("the review has a request")?;
    let new = request.object.context("the request has an object")?;
    let old = request.old_object.context("the request has an oldObject")?;
    let target = admission::decide::Target {
        namespace: "shop",
        name: "podinfo",
    };
    let reviewed = admission::review(body, &config)?;

    /// Mean time of `f` in µs over enough runs to fill ~200 ms (after a short warm-up).
    fn time(mut f: impl FnMut()) -> f64 {
        for _ in 0..50 {
            f();
        }
        let start = Instant::now();
        let mut runs = 0u32;
        while start.elapsed() < Duration::from_millis(200) {
            for _ in 0..20 {
                f();
            }
            runs += 20;
        }
        start.elapsed().as_secs_f64() * 1e6 / f64::from(runs)
    }
    let whole = time(|| {
        std::hint::black_box(admission::review(std::hint::black_box(body), &config).ok());
    });
    let decode = time(|| {
        std::hint::black_box(serde_json::from_slice::<AdmissionReview<Deployment>>(std::hint::black_box(body)).ok());
    });
    let decide = time(|| {
        std::hint::black_box(admission::decide::decide(
            admission::decide::Change::Update { old: &old },
            target,
            std::hint::black_box(&new),
        ));
    });
    let encode = time(|| {
        std::hint::black_box(std::hint::black_box(&reviewed).to_json(false).ok());
    });
    let steps: Vec<(&str, f64)> = vec![
        ("admission::review, whole", whole),
        ("  decode: bytes -> AdmissionReview<Deployment>", decode),
        ("  decide (strip, compare, stamp, hash, clone)", decide),
        (
            "  the rest: patch of the touched parts, response",
            (whole - decode - decide).max(0.0),
        ),
        ("encode the response (Reviewed::to_json, in the handler)", encode),
        (
            "compare: scan the body, build nothing (IgnoredAny)",
            time(|| {
                std::hint::black_box(serde_json::from_slice::<serde::de::IgnoredAny>(std::hint::black_box(body)).ok());
            }),
        ),
    ];
    println!("turnout's admission steps on one thread, no TLS or HTTP (mean µs per review):");
    for (name, us) in steps {
        println!("  {name:<58} {us:>8.1}");
    }
    // The same on every CPU at once: what sharing the cores (and the allocator) costs by itself.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    time(|| {
                        std::hint::black_box(admission::review(std::hint::black_box(body), &config).ok());
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(f64::NAN)).collect()
    });
    println!(
        "  {:<58} {:>8.1}",
        format!("admission::review on {threads} threads at once, per thread"),
        per_thread.iter().sum::<f64>() / per_thread.len() as f64
    );
    Ok(())
}

const REVIEW_UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

/// A Deployment UPDATE review as the apiserver sends it for `kubectl apply` of a new image: a
/// podinfo-like Deployment already stamped by turnout (revision 1), whose image changes, so turnout
/// holds the update as release 2 and answers with a patch.
fn review_body() -> Vec<u8> {
    let old = deployment("6.7.0", "2026-03-02T09:14:07Z");
    let new = deployment("6.7.1", "2026-03-09T16:41:55Z");
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": REVIEW_UID,
            "kind": { "group": "apps", "version": "v1", "kind": "Deployment" },
            "resource": { "group": "apps", "version": "v1", "resource": "deployments" },
            "requestKind": { "group": "apps", "version": "v1", "kind": "Deployment" },
            "requestResource": { "group": "apps", "version": "v1", "resource": "deployments" },
            "name": "podinfo",
            "namespace": "shop",
            "operation": "UPDATE",
            "userInfo": {
                "username": "kubernetes-admin",
                "groups": ["kubeadm:cluster-admins", "system:authenticated"]
            },
            "object": new,
            "oldObject": old,
            "dryRun": false,
            "options": {
                "kind": "UpdateOptions",
                "apiVersion": "meta.k8s.io/v1",
                "fieldManager": "kubectl-client-side-apply",
                "fieldValidation": "Strict"
            }
        }
    });
    serde_json::to_vec(&review).expect("a JSON value serialises")
}

/// The Deployment as stored (or as applied) with the podinfo image `tag`.
fn deployment(tag: &str, applied_at: &str) -> Value {
    let image = format!("ghcr.io/stefanprodan/podinfo:{tag}");
    let probe = |path: &str| {
        json!({
            "httpGet": { "path": path, "port": 9898, "scheme": "HTTP" },
            "timeoutSeconds": 5, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3
        })
    };
    let container = json!({
        "name": "podinfod",
        "image": image,
        "ports": [
            { "name": "http", "containerPort": 9898, "protocol": "TCP" },
            { "name": "metrics", "containerPort": 9797, "protocol": "TCP" }
        ],
        "env": [{ "name": "PODINFO_UI_COLOR", "value": "#34577c" }],
        "resources": {
            "limits": { "cpu": "1", "memory": "256Mi" },
            "requests": { "cpu": "100m", "memory": "64Mi" }
        },
        "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        "livenessProbe": probe("/healthz"),
        "readinessProbe": probe("/readyz"),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent"
    });
    // What the user applied: their manifest, without turnout's stamps or the apiserver's defaults.
    let applied = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "annotations": {},
            "labels": { "app": "podinfo", "team": "shop" },
            "name": "podinfo",
            "namespace": "shop"
        },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "podinfo" } },
            "template": {
                "metadata": { "labels": { "app": "podinfo" } },
                "spec": {
                    "containers": [{
                        "name": "podinfod",
                        "image": image,
                        "ports": [{ "containerPort": 9898, "name": "http" }]
                    }]
                }
            }
        }
    });
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "podinfo",
            "namespace": "shop",
            "uid": "2c5ea8d4-2f1b-4f5e-9a57-0d3c9b1e7a41",
            "resourceVersion": "184467",
            "generation": 4,
            "creationTimestamp": "2026-03-02T09:14:07Z",
            "labels": { "app": "podinfo", "team": "shop" },
            "annotations": {
                "deployment.kubernetes.io/revision": "3",
                "kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n"),
                "turnout.dev/revision": "1",
                "turnout.dev/version-stamped": "true"
            },
            "managedFields": [
                {
                    "manager": "kubectl-client-side-apply",
                    "operation": "Update",
                    "apiVersion": "apps/v1",
                    "time": applied_at,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:annotations": { ".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {} },
                            "f:labels": { ".": {}, "f:app": {}, "f:team": {} }
                        },
                        "f:spec": {
                            "f:replicas": {},
                            "f:template": {
                                "f:spec": { "f:containers": { "k:{\"name\":\"podinfod\"}": { ".": {}, "f:image": {}, "f:name": {} } } }
                            }
                        }
                    }
                }
            ]
        },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "podinfo" } },
            "template": {
                "metadata": {
                    "labels": { "app": "podinfo", "turnout.dev/revision": "1", "version": "v1" },
                    "annotations": { "prometheus.io/scrape": "true" }
                },
                "spec": {
                    "containers": [container],
                    "volumes": [{ "name": "data", "emptyDir": {} }],
                    "restartPolicy": "Always",
                    "terminationGracePeriodSeconds": 30,
                    "dnsPolicy": "ClusterFirst",
                    "securityContext": {},
                    "schedulerName": "default-scheduler"
                }
            },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": "25%", "maxSurge": "25%" } },
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600
        },
        "status": {
            "observedGeneration": 4,
            "replicas": 2,
            "updatedReplicas": 2,
            "readyReplicas": 2,
            "availableReplicas": 2
        }
    })
}
