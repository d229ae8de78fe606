//! `cortex serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.
//!
//! axum routes on a small tokio runtime of its own, in the same process as the engine
//! thread: a request is parsed and tokenized here into a [`Job`] ([`api::job`]), each
//! choice is submitted to the [`Engine`] with an async [`Sink`], and the engine's events
//! are turned into JSON, whole or as server-sent events, without a Python hop per token.
//! Every open HTTP request is a [`Flight`]: it holds its admission slots and its engine
//! requests, and when it ends — finished, failed, or dropped because the client went
//! away — it aborts what still runs, frees its slots and writes the access-log line and
//! metrics.
//!
//! What input may cost is bounded: connections (`MAX_CONNECTIONS`, headers within
//! `HEADER_TIMEOUT`, in our own accept loop), bodies (`MAX_BODY_BYTES` each, arriving
//! within `BODY_TIMEOUT`, `BODY_BUDGET_MIB` together), sequences (`max_batch_size +
//! max_queue` admitted, 429 beyond), and a client that stops reading (its connection is
//! closed, and its request aborted, once a write has waited `write_timeout`). [`Server::shutdown`] stops accepting connections, lets
//! running requests finish for `shutdown_timeout`, then aborts the rest.

mod api;
mod deadline;
mod metrics;
mod tools;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future::{select, Either};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::engine::{Engine, Event, Output, RequestId, Sink};
use crate::error::{Error, Result};
use crate::tokenizer::{ChatTemplate, Tokenizer};

use api::{Choice, Delta, Endpoint, Header, Job, Usage};
use metrics::Metrics;

/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Default number of sequences that may wait beyond the running batch.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default time running requests get to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a response's write may wait for a client that reads nothing (see
/// `deadline.rs`).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Request bodies being read or prepared at once may hold this many MiB together (a body
/// counts its Content-Length, or the most a body may be without one); past it, 429.
const BODY_BUDGET_MIB: usize = 256;
/// A body must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// After the shutdown deadline has aborted what was running, how long connections get
/// to close before the server stops regardless.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most connections served at once; past it, new ones wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// A request's headers must arrive within this time (a slowloris client is cut off).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// What a 429 asks the client to wait, in seconds.
const RETRY_AFTER_S: u64 = 1;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port ([`Server::addr`] tells which).
    pub port: u16,
    /// When set, `/v1/*` requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The name `/v1/models` lists and requests' `model` must match.
    pub served_model_name: String,
    /// Sequences admitted beyond the engine's `max_batch_size` before 429s.
    pub max_queue: usize,
    /// A chat template's source, used instead of the model's.
    pub chat_template: Option<String>,
    pub shutdown_timeout: Duration,
    /// A client whose socket takes nothing for this long loses its connection and its
    /// request.
    pub write_timeout: Duration,
    /// One line per request on stderr.
    pub access_log: bool,
    /// Serve on an address other than loopback without an API key.
    pub insecure: bool,
}

/// An error response, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn invalid(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError {
            param,
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    fn shutting_down() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
        .code("server_shutting_down")
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidParam { param, .. } | Error::Grammar { param, .. } => {
                ApiError::invalid(message, Some(param))
            }
            Error::ContextLength { .. } | Error::CacheFull { .. } => {
                ApiError::invalid(message, None).code("context_length_exceeded")
            }
            Error::Tokenizer(_) | Error::Template(_) => ApiError::invalid(message, None),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }
}

impl ApiError {
    fn json(&self) -> Json {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.json());
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        r
    }
}

fn json_response(status: StatusCode, body: &Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The server's shared state.
struct App {
    engine: Arc<Engine>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    config: ServerConfig,
    /// Unix time the server started (`created` of `/v1/models`).
    started: u64,
    /// Distinguishes this process's response ids from another replica's.
    instance: u64,
    next_id: AtomicU64,
    metrics: Metrics,
    /// Sequences admitted and not yet ended (a choice counts one)...
    in_flight: AtomicUsize,
    /// ...and the most admitted at once: the engine's batch plus `max_queue`.
    capacity: usize,
    /// MiB of request bodies being read or prepared (see [`BODY_BUDGET_MIB`]).
    bodies: Arc<Semaphore>,
    /// Engine requests of every open HTTP request: what the shutdown deadline aborts.
    running: Mutex<HashSet<RequestId>>,
    draining: AtomicBool,
}

impl App {
    fn header(&self, endpoint: Endpoint) -> Header {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Header {
            id: format!("{}{:x}{n:08x}", endpoint.id_prefix(), self.instance),
            created: unix_now(),
            model: self.config.served_model_name.clone(),
        }
    }

    /// The access-log line and the request counter.
    fn log(&self, line: &Line, status: u16, usage: Option<Usage>, note: &str) {
        let elapsed = line.arrived.elapsed();
        self.metrics.request(line.endpoint, status, elapsed);
        if !self.config.access_log {
            return;
        }
        let tokens = usage.map_or(String::new(), |u| {
            format!(
                " prompt={} completion={}",
                u.prompt_tokens, u.completion_tokens
            )
        });
        // A closed stderr must not take the server down (eprintln! would panic).
        let _ = writeln!(
            std::io::stderr().lock(),
            "{} {} {status}{tokens} {:.3}s{note}",
            line.method,
            line.path,
            elapsed.as_secs_f64()
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the access log says about a request.
#[derive(Debug, Clone)]
struct Line {
    method: String,
    /// The request path, cut to a sane length.
    path: String,
    /// The metric label: a known route, or "other" (paths are the client's to choose, and
    /// a label per path would grow without bound).
    endpoint: &'static str,
    arrived: Instant,
}

/// Marks a response whose request is logged by its [`Flight`] when it ends.
#[derive(Debug, Clone, Copy)]
struct Logged;

/// One open generation request: its admission slots and engine requests. Dropping it
/// aborts the requests still running, frees the slots and logs the request.
struct Flight {
    app: Arc<App>,
    line: Line,
    /// Engine request → choice index.
    choice: HashMap<RequestId, usize>,
    /// Requests whose last event has not arrived.
    open: HashSet<RequestId>,
    /// Per choice, when its latest token arrived.
    last_token: Vec<Option<Instant>>,
    slots: usize,
    usage: Usage,
    status: u16,
    /// Set once every choice has ended and the response was delivered.
    completed: bool,
}

impl Flight {
    /// Takes `choices` slots, or fails with 429 when the server is full.
    fn admit(app: &Arc<App>, line: Line, choices: usize) -> std::result::Result<Self, ApiError> {
        let admitted = app
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n + choices <= app.capacity).then_some(n + choices)
            })
            .is_ok();
        if !admitted {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the server is at capacity ({} sequences running or queued); retry later",
                    app.capacity
                ),
            )
            .code("rate_limit_exceeded"));
        }
        Ok(Flight {
            app: app.clone(),
            line,
            choice: HashMap::new(),
            open: HashSet::new(),
            last_token: vec![None; choices],
            slots: choices,
            usage: Usage::default(),
            status: 200,
            completed: false,
        })
    }

    /// Submits every choice of `job`, its events to `tx`; all or none.
    fn submit(&mut self, job: &Job, tx: &mpsc::UnboundedSender<Output>) -> Result<()> {
        self.usage.prompt_tokens = job.prompt_tokens();
        for (k, params) in job.params.iter().enumerate() {
            let tokens = job.inputs[k / job.n].tokens.clone();
            // On an error, dropping the flight aborts the choices already submitted.
            let id = self.app.engine.submit(
                tokens,
                params.clone(),
                self.app.tokenizer.clone(),
                Sink::Async(tx.clone()),
            )?;
            self.choice.insert(id, k);
            self.open.insert(id);
            self.app.running.lock().insert(id);
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.open.is_empty()
    }

    /// Accounts for `out` (latencies, tokens, its request's end); returns its choice.
    fn observe(&mut self, out: &Output) -> Option<usize> {
        let &k = self.choice.get(&out.id)?;
        if let Event::Token(_) = out.event {
            let now = Instant::now();
            if self.usage.completion_tokens == 0 {
                self.app.metrics.first_token(now - self.line.arrived);
            }
            if let Some(prev) = self.last_token[k].replace(now) {
                self.app.metrics.inter_token(now - prev);
            }
            self.usage.completion_tokens += 1;
        }
        if out.event.is_last() {
            self.open.remove(&out.id);
        }
        Some(k)
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        for &id in &self.open {
            self.app.engine.abort(id);
        }
        {
            let mut running = self.app.running.lock();
            for id in self.choice.keys() {
                running.remove(id);
            }
        }
        self.app.in_flight.fetch_sub(self.slots, Ordering::AcqRel);
        self.app
            .metrics
            .tokens(self.usage.prompt_tokens, self.usage.completion_tokens);
        // nginx's code for a client that closed its connection before the response ended.
        let (status, note) = if self.completed || self.status != 200 {
            (self.status, "")
        } else {
            (499, " (client disconnected)")
        };
        self.app.log(&self.line, status, Some(self.usage), note);
    }
}

fn line_of(req: &Request) -> Line {
    let path = req.uri().path();
    let endpoint = match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    };
    let mut cut = path.len().min(200);
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    Line {
        method: req.method().to_string(),
        path: path[..cut].to_string(),
        endpoint,
        arrived: Instant::now(),
    }
}

/// Compares in time independent of where the first difference is.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same_key(given.trim().as_bytes(), key.as_bytes()))
}

/// A body declared as anything but JSON is refused (415); a request without a content
/// type is read as JSON, as OpenAI's clients and `curl --json` send it.
fn json_content_type(headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let media = v
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if media.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("the body must be application/json, not '{media}'"),
        ))
    }
}

/// Authentication (every path but `/health` and `/metrics`), a POST body's content type,
/// and the access log and request counter for every response a [`Flight`] does not log
/// itself.
async fn access(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let line = line_of(&req);
    req.extensions_mut().insert(line.clone());
    // Every path but the two probes needs the key: an allow-list, so that no spelling of
    // a protected path (`//v1/...`, `%2F`) slips past a prefix check.
    let open = matches!(line.endpoint, "/health" | "/metrics");
    let response = match app.config.api_key.as_deref() {
        Some(key) if !open && !authorized(req.headers(), key) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "a valid API key is required (Authorization: Bearer <key>)",
        )
        .code("invalid_api_key")
        .into_response(),
        _ => match json_content_type(req.headers()) {
            Err(e) if req.method() == axum::http::Method::POST => e.into_response(),
            _ => next.run(req).await,
        },
    };
    if response.extensions().get::<Logged>().is_none() {
        app.log(&line, response.status().as_u16(), None, "");
    }
    response
}

async fn chat(State(app): State<Arc<App>>, req: Request) -> Response {
    generate(app, Endpoint::Chat, req).await
}

async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    generate(app, Endpoint::Completions, req).await
}

async fn generate(app: Arc<App>, endpoint: Endpoint, req: Request) -> Response {
    match run(app, endpoint, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn read_body(body: Body) -> std::result::Result<Bytes, ApiError> {
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the body is larger than {MAX_BODY_BYTES} bytes, or was cut off"),
        )),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// Reserves the body's share of [`BODY_BUDGET_MIB`], or refuses with 429.
fn body_budget(
    app: &App,
    headers: &HeaderMap,
) -> std::result::Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(MAX_BODY_BYTES)
        .min(MAX_BODY_BYTES);
    let mib = declared.div_ceil(1 << 20).max(1) as u32;
    app.bodies.clone().try_acquire_many_owned(mib).map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is reading {BODY_BUDGET_MIB} MiB of request bodies already; retry later"
            ),
        )
        .code("rate_limit_exceeded")
    })
}

async fn run(
    app: Arc<App>,
    endpoint: Endpoint,
    req: Request,
) -> std::result::Result<Response, ApiError> {
    if app.draining.load(Ordering::Acquire) {
        return Err(ApiError::shutting_down());
    }
    let line = req
        .extensions()
        .get::<Line>()
        .cloned()
        .unwrap_or_else(|| line_of(&req));
    // Held until the request is tokenized: many large bodies at once must not exhaust
    // memory.
    let budget = body_budget(&app, req.headers())?;
    let bytes = read_body(req.into_body()).await?;
    let body = api::Body::parse(&bytes).map_err(|e| ApiError::invalid(e.message, e.param))?;
    drop(bytes);
    if let Some(model) = body.model() {
        if model != app.config.served_model_name {
            return Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model '{model}' does not exist; this server serves '{}'",
                        app.config.served_model_name
                    ),
                )
                .code("model_not_found")
            });
        }
    }
    // Templates and tokenizers take real CPU time on long inputs: off the async workers.
    let tokenizing = app.clone();
    let job = tokio::task::spawn_blocking(move || {
        let context = tokenizing.engine.model().config.max_position_embeddings;
        api::job(
            endpoint,
            &body,
            &tokenizing.tokenizer,
            tokenizing.template.as_ref(),
            context,
        )
    })
    .await
    .map_err(|e| {
        ApiError::from(Error::Internal(format!(
            "preparing the request failed: {e}"
        )))
    })??;
    drop(budget);
    let mut flight = Flight::admit(&app, line, job.num_choices())?;
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(e) = flight.submit(&job, &tx) {
        let e = ApiError::from(e);
        flight.status = e.status.as_u16();
        let mut r = e.into_response();
        r.extensions_mut().insert(Logged);
        return Ok(r);
    }
    // Only the engine's requests hold senders now: the channel closes when they end.
    drop(tx);
    let header = app.header(endpoint);
    let mut response = if job.stream {
        sse(SseState::new(app, job, header, flight, rx))
    } else {
        collect(&app, &job, &header, flight, rx).await
    };
    response.extensions_mut().insert(Logged);
    Ok(response)
}

/// Waits for every choice and answers with the whole response.
async fn collect(
    app: &App,
    job: &Job,
    header: &Header,
    mut flight: Flight,
    mut rx: mpsc::UnboundedReceiver<Output>,
) -> Response {
    let mut choices: Vec<Choice> = (0..job.num_choices()).map(|_| Choice::default()).collect();
    while !flight.is_done() {
        let Some(out) = rx.recv().await else { break };
        let Some(k) = flight.observe(&out) else {
            continue;
        };
        match out.event {
            Event::Token(step) => {
                choices[k].push(&step);
                choices[k].finish = step.finish_reason.map(crate::engine::FinishReason::as_str);
            }
            Event::Aborted => choices[k].finish = Some("abort"),
            Event::Failed(e) => {
                let e = ApiError::from(api::rename_constraint_error(e, job.constraint_field));
                flight.status = e.status.as_u16();
                return e.into_response();
            }
        }
    }
    if !flight.is_done() {
        let e = ApiError::from(Error::Engine("the engine stopped".into()));
        flight.status = e.status.as_u16();
        return e.into_response();
    }
    let body = api::response(job, header, &choices, flight.usage, &app.tokenizer);
    flight.completed = true;
    json_response(StatusCode::OK, &body)
}

/// A streamed response's state between chunks.
struct SseState {
    app: Arc<App>,
    job: Job,
    header: Header,
    flight: Flight,
    rx: mpsc::UnboundedReceiver<Output>,
    /// Frames ready to send.
    ready: std::collections::VecDeque<Bytes>,
    ended: bool,
    /// One per choice when the request offers tools: its output split into text and calls.
    parsers: Vec<tools::CallParser>,
}

fn frame(v: &Json) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl SseState {
    fn new(
        app: Arc<App>,
        job: Job,
        header: Header,
        flight: Flight,
        rx: mpsc::UnboundedReceiver<Output>,
    ) -> Self {
        let mut ready = std::collections::VecDeque::new();
        // Chat streams open every choice with the assistant's role, as OpenAI's do.
        if job.endpoint == Endpoint::Chat {
            for index in 0..job.num_choices() {
                let d = Delta {
                    index,
                    text: "",
                    tokens: &[],
                    finish: None,
                    first: true,
                };
                ready.push_back(frame(&api::chunk(&job, &header, &d, &app.tokenizer)));
            }
        }
        let parsers = (0..job.num_choices())
            .map_while(|_| job.call_parser())
            .collect();
        SseState {
            app,
            job,
            header,
            flight,
            rx,
            ready,
            ended: false,
            parsers,
        }
    }

    /// Turns one engine event into frames.
    fn handle(&mut self, out: Output) {
        let Some(index) = self.flight.observe(&out) else {
            return;
        };
        let (text, tokens, finish) = match out.event {
            Event::Token(step) => {
                let finish = step.finish_reason.map(crate::engine::FinishReason::as_str);
                let tokens = vec![(step.token, step.logprobs)];
                (step.text, tokens, finish)
            }
            Event::Aborted => (String::new(), vec![], Some("abort")),
            Event::Failed(e) => {
                let e = ApiError::from(api::rename_constraint_error(e, self.job.constraint_field));
                self.flight.status = e.status.as_u16();
                self.ready.push_back(frame(&e.json()));
                return;
            }
        };
        if let Some(parser) = self.parsers.get_mut(index) {
            // Tools on (and so no logprobs): text and calls as the parser splits them.
            let before = parser.calls();
            let mut pieces = parser.push(&text);
            if finish.is_some() {
                pieces.extend(parser.finish());
            }
            let made_calls = parser.calls() > 0;
            // The position of the latest call among the choice's calls.
            let mut k = before.wrapping_sub(1);
            for piece in pieces {
                let chunk = match piece {
                    tools::Piece::Text(text) => {
                        let d = Delta {
                            index,
                            text: &text,
                            tokens: &[],
                            finish: None,
                            first: false,
                        };
                        api::chunk(&self.job, &self.header, &d, &self.app.tokenizer)
                    }
                    tools::Piece::Call { id, name } => {
                        k = k.wrapping_add(1);
                        let call = json!({"index": k, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}});
                        api::call_chunk(&self.job, &self.header, index, call)
                    }
                    tools::Piece::Args(args) => {
                        let call = json!({"index": k, "function": {"arguments": args}});
                        api::call_chunk(&self.job, &self.header, index, call)
                    }
                };
                self.ready.push_back(frame(&chunk));
            }
            if let Some(f) = finish {
                let d = Delta {
                    index,
                    text: "",
                    tokens: &[],
                    finish: Some(if made_calls { api::call_finish(f) } else { f }),
                    first: false,
                };
                let chunk = api::chunk(&self.job, &self.header, &d, &self.app.tokenizer);
                self.ready.push_back(frame(&chunk));
            }
            return;
        }
        // Text held back (an incomplete character or stop string) makes no chunk.
        if text.is_empty() && finish.is_none() && self.job.logprobs.is_none() {
            return;
        }
        let d = Delta {
            index,
            text: &text,
            tokens: &tokens,
            finish,
            first: false,
        };
        let chunk = api::chunk(&self.job, &self.header, &d, &self.app.tokenizer);
        self.ready.push_back(frame(&chunk));
    }

    /// The next frame, or `None` once `[DONE]` has gone.
    async fn next(mut self) -> Option<(std::result::Result<Bytes, Infallible>, Self)> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some((Ok(b), self));
            }
            if self.ended {
                self.flight.completed = true;
                return None;
            }
            if self.flight.is_done() {
                if self.job.include_usage {
                    let u = api::usage_chunk(&self.job, &self.header, self.flight.usage);
                    self.ready.push_back(frame(&u));
                }
                self.ready
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.ended = true;
                continue;
            }
            if let Some(out) = self.rx.recv().await {
                self.handle(out);
            } else {
                let e = ApiError::from(Error::Engine("the engine stopped".into()));
                self.flight.status = e.status.as_u16();
                self.ready.push_back(frame(&e.json()));
                self.flight.open.clear();
            }
        }
    }
}

fn sse(state: SseState) -> Response {
    let stream = futures::stream::unfold(state, SseState::next);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| {
            ApiError::from(Error::Internal(format!("building a stream response: {e}")))
                .into_response()
        })
}

async fn models(State(app): State<Arc<App>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{
                "id": app.config.served_model_name,
                "object": "model",
                "created": app.started,
                "owned_by": "cortex",
                "max_model_len": app.engine.model().config.max_position_embeddings,
            }],
        }),
    )
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::Acquire) {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "shutting_down"}),
        )
    } else {
        json_response(StatusCode::OK, &json!({"status": "ok"}))
    }
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&app.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// A running server. Dropping it stops it at once (what is running is aborted); call
/// [`Server::shutdown`] and wait for a graceful stop.
pub struct Server {
    addr: SocketAddr,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    stopped: Mutex<std::sync::mpsc::Receiver<()>>,
    done: AtomicBool,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// Binds `config.host:config.port` and serves `engine` on a runtime of its own.
    pub fn start(
        engine: Arc<Engine>,
        tokenizer: Arc<Tokenizer>,
        config: ServerConfig,
    ) -> Result<Server> {
        if config.served_model_name.is_empty() {
            return Err(Error::param("served_model_name", "must not be empty"));
        }
        // The grammar compiler takes a fraction of a second to build for a vocabulary:
        // built now, in the background, the first response_format or tools request does
        // not wait for it (a request that comes sooner waits for this build, never
        // starts another). A tokenizer it cannot serve fails those requests alone.
        let warming = tokenizer.clone();
        std::thread::Builder::new()
            .name("cortex-grammars".into())
            .spawn(move || drop(warming.grammars()))
            .map_err(|e| Error::Internal(format!("starting a thread: {e}")))?;
        let template = config
            .chat_template
            .as_deref()
            .map(|source| tokenizer.chat_template_from(source))
            .transpose()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cortex-http")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::Engine(format!("cannot start the server's runtime: {e}")))?;
        let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                Error::param(
                    "port",
                    format!("cannot listen on {}:{}: {e}", config.host, config.port),
                )
            })?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Engine(format!("cannot listen: {e}")))?;
        if !bound.ip().is_loopback() && config.api_key.is_none() && !config.insecure {
            return Err(Error::param(
                "api_key",
                format!(
                    "{} is reachable from other machines: set an API key (--api-key or \
                     CORTEX_API_KEY), or pass --insecure to serve without one",
                    bound.ip()
                ),
            ));
        }
        let listener = {
            let _inside = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
        }
        .map_err(|e| Error::Engine(format!("cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Engine(format!("cannot listen: {e}")))?;
        let capacity = engine.config().max_batch_size + config.max_queue;
        let app = Arc::new(App {
            engine,
            tokenizer,
            template,
            started: unix_now(),
            instance: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()).rotate_left(32),
            next_id: AtomicU64::new(0),
            metrics: Metrics::default(),
            in_flight: AtomicUsize::new(0),
            capacity,
            bodies: Arc::new(Semaphore::new(BODY_BUDGET_MIB)),
            running: Mutex::new(HashSet::new()),
            draining: AtomicBool::new(false),
            config,
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(prometheus))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(app.clone(), access))
            .with_state(app.clone());
        let (stop, mut on_stop) = watch::channel(false);
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let mut graceful = stop.subscribe();
        let serving = stopped_tx.clone();
        let write_timeout = app.config.write_timeout;
        runtime.spawn(async move {
            accept_loop(listener, router, write_timeout, &mut graceful).await;
            let _ = serving.send(());
        });
        // The deadline: once shutdown begins, what still runs after `shutdown_timeout` is
        // aborted, and connections get CLOSE_GRACE more to deliver their last chunks.
        let deadline_app = app.clone();
        runtime.spawn(async move {
            if on_stop.wait_for(|&s| s).await.is_err() {
                return;
            }
            tokio::time::sleep(deadline_app.config.shutdown_timeout).await;
            abort_all(&deadline_app);
            tokio::time::sleep(CLOSE_GRACE).await;
            let _ = stopped_tx.send(());
        });
        Ok(Server {
            addr,
            app,
            stop,
            stopped: Mutex::new(stopped),
            done: AtomicBool::new(false),
            runtime: Some(runtime),
        })
    }

    /// The address listened on (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.app.engine
    }

    /// Begins a graceful stop: no new connections or requests; running requests finish,
    /// or are aborted once `shutdown_timeout` has passed. Returns at once.
    pub fn shutdown(&self) {
        self.app.draining.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }

    /// Waits up to `timeout` for the server to have stopped; true once it has.
    pub fn wait_within(&self, timeout: Duration) -> bool {
        if self.done.load(Ordering::Acquire) {
            return true;
        }
        let stopped = self.stopped.lock().recv_timeout(timeout).is_ok();
        if stopped {
            self.done.store(true, Ordering::Release);
        }
        stopped
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not `Send`).
    let _ = stop.wait_for(|&s| s).await.map(|_| ());
}

/// Accepts connections until `stop` turns true, each served on its own task, at most
/// `MAX_CONNECTIONS` at once; then lets every open connection finish its response (idle
/// ones close at once) and returns when all have closed.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    write_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let next = {
            let accept = async {
                let slot = slots.clone().acquire_owned().await;
                (slot, listener.accept().await)
            };
            let stopping = stopped(stop);
            futures::pin_mut!(accept, stopping);
            match select(accept, stopping).await {
                Either::Left((next, _)) => next,
                Either::Right(_) => break,
            }
        };
        let (Ok(slot), Ok((tcp, _))) = next else {
            // Out of file descriptors, or a connection reset before it was accepted:
            // pause rather than spin, then go on.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Without TCP_NODELAY, Nagle's algorithm holds each small stream chunk until the
        // previous one is acknowledged (up to the peer's 40 ms delayed ACK).
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(
                    TokioIo::new(deadline::WriteDeadline::new(tcp, write_timeout)),
                    service,
                );
            let stopping = stopped(&mut stop);
            futures::pin_mut!(conn, stopping);
            if let Either::Right(_) = select(conn.as_mut(), stopping).await {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
    }
    // Every slot back: every connection has closed.
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
}

/// Aborts every engine request of every open HTTP request.
fn abort_all(app: &App) {
    for &id in app.running.lock().iter() {
        app.engine.abort(id);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
        abort_all(&self.app);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secre", b"secret"));
        assert!(!same_key(b"secreT", b"secret"));
        assert!(!same_key(b"", b"secret"));
    }

    #[test]
    fn errors_map_to_openai_statuses() {
        let e = ApiError::from(Error::param("temperature", "3 is not in [0, 2]"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.json()["error"]["param"], "temperature");
        let e = ApiError::from(Error::ContextLength {
            prompt_tokens: 9000,
            context_length: 8192,
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.json()["error"]["code"], "context_length_exceeded");
        let e = ApiError::from(Error::Engine("NaN logits".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
