//! The console: pages at `/ui` (HTML, a script and a style sheet, built
//! into the binary: nothing is fetched from elsewhere) that show the fleet
//! through the same API `comsat ctl` uses, and the sessions it signs in
//! with.
//!
//! Signing in (`POST /ui/session` with an API token) opens a session: a
//! random cookie (`HttpOnly`, `Secure`, `SameSite=Strict`; only its
//! SHA-256 is stored) that then authenticates API requests as the token it
//! was opened with would, under the same role checks, for
//! `console_session_secs` or until that token is revoked or expires. A
//! request that changes anything must also carry the session's CSRF token
//! in `X-CSRF-Token` (the page holds it in memory, never in storage). A
//! sign-in must be JSON and not from another site (`Sec-Fetch-Site`), so
//! no other site can sign a browser in as someone else. The API token
//! itself is never put in a page, a cookie or a log.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use comsat_protocol::api::{self, ConsoleSessionInfo, ConsoleSignIn};

use super::AppState;
use super::access::{Audited, Policy, Routes, delete, get, post};
use super::auth::{Principal, authenticate_token, check_not_limited, refuse_auth, rules_of};
use super::parse_json;
use crate::audit::{Caller, Outcome};
use crate::init::token_hash;
use crate::state::{ApiError, Shared};
use crate::store::ConsoleSession;
use crate::unix_now;

/// The session cookie's name.
const COOKIE: &str = "comsat_session";
/// The header a change request carries the session's CSRF token in.
const CSRF_HEADER: &str = "x-csrf-token";
/// Hex digits of a session cookie and a CSRF token (32 random bytes).
const SECRET_HEX: usize = 64;
/// Sessions one API token may hold at once; signing in again ends the
/// oldest beyond this, so no token holder can grow the table without
/// bound.
const MAX_SESSIONS_PER_TOKEN: usize = 16;

const PAGE: &str = include_str!("console/console.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// What every console asset and session answer carries: it may not be
/// framed, cached, or load anything from elsewhere.
const HARDENING: [(header::HeaderName, &str); 5] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::CACHE_CONTROL, "no-store"),
];

pub(super) fn routes(routes: Routes) -> Routes {
    routes
        .add(
            api::PATH_CONSOLE,
            Policy::public(),
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .add(
            api::PATH_CONSOLE_SCRIPT,
            Policy::public(),
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .add(
            api::PATH_CONSOLE_STYLE,
            Policy::public(),
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .add(
            api::PATH_CONSOLE_SESSION,
            Policy::public().audited("session.create"),
            post(sign_in),
        )
        .add(
            api::PATH_CONSOLE_SESSION,
            Policy::public(),
            get(session_info),
        )
        .add(
            api::PATH_CONSOLE_SESSION,
            Policy::public().audited("session.delete"),
            delete(sign_out),
        )
}

fn hardened(mut response: Response) -> Response {
    for (name, value) in HARDENING {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    hardened(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The session cookie's value in `headers`, if one is well formed.
pub(super) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| v.len() == SECRET_HEX && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
}

/// Whether `method` only reads.
fn reads_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// The valid, unexpired session of `cookie`; a change request must carry
/// its CSRF token. Refusals are audited.
async fn live_session(
    state: &Shared,
    caller: &Caller,
    cookie: &str,
) -> Result<ConsoleSession, ApiError> {
    let Some(session) = state.store.console_session(&token_hash(cookie)).await? else {
        return Err(refuse_auth(
            state,
            caller,
            "anonymous",
            "unknown or ended console session",
        )
        .await);
    };
    if session.expires_at <= unix_now() {
        return Err(refuse_auth(state, caller, "anonymous", "console session expired").await);
    }
    if !reads_only(&caller.method) {
        let sent = caller
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        // Compared as hashes: how long the comparison takes tells nothing
        // of the token.
        if token_hash(sent) != token_hash(&session.csrf) {
            let reason = "a change from a console session without its X-CSRF-Token";
            state
                .audit(
                    caller,
                    "anonymous",
                    "authenticate",
                    &caller.path,
                    Outcome::Denied,
                    Some(reason),
                )
                .await;
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden: a change from the console needs its session's X-CSRF-Token header"
                    .to_owned(),
            ));
        }
    }
    Ok(session)
}

/// The hash of the API token `cookie`'s session acts for.
pub(super) async fn session_token(
    state: &Shared,
    caller: &Caller,
    cookie: &str,
) -> Result<String, ApiError> {
    Ok(live_session(state, caller, cookie).await?.token_hash)
}

fn cookie_header(value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("comsat_session=; Max-Age=0"))
}

/// `POST /ui/session`: an API token in, a session cookie out.
async fn sign_in(State(state): State<AppState>, caller: Caller, body: Bytes) -> Response {
    match open_session(&state, &caller, &body).await {
        Ok((cookie, info)) => {
            let subject = info.subject.clone();
            let mut response = (
                StatusCode::CREATED,
                Audited::on("session").by(subject),
                axum::Json(info),
            )
                .into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                cookie_header(&cookie, state.config.console_session_secs),
            );
            hardened(response)
        }
        Err(e) => hardened(e.into_response()),
    }
}

async fn open_session(
    state: &Shared,
    caller: &Caller,
    body: &[u8],
) -> Result<(String, ConsoleSessionInfo), ApiError> {
    check_not_limited(state, caller)?;
    // A sign-in comes from the console's own page: JSON, never a form
    // another site posts (which could sign a browser in as someone else).
    let json = caller
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "sign in with a JSON body (Content-Type: application/json)",
        ));
    }
    if caller
        .headers
        .get("sec-fetch-site")
        .is_some_and(|v| v == "cross-site")
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden: a sign-in from another site",
        ));
    }
    let asked: ConsoleSignIn = parse_json(body)?;
    if asked.token.is_empty() || asked.token.len() > api::MAX_TOKEN_LEN {
        return Err(ApiError::bad_request(format!(
            "token: an API token of 1 to {} bytes",
            api::MAX_TOKEN_LEN
        )));
    }
    let hash = token_hash(asked.token.trim());
    let principal = authenticate_token(state, caller, &hash).await?;
    let now = unix_now();
    let cookie = hex::encode(rand::random::<[u8; 32]>());
    let session = ConsoleSession {
        id_hash: token_hash(&cookie),
        token_hash: hash,
        csrf: hex::encode(rand::random::<[u8; 32]>()),
        created_at: now,
        expires_at: now + state.config.console_session_secs,
    };
    state
        .store
        .create_console_session(&session, now, MAX_SESSIONS_PER_TOKEN)
        .await?;
    Ok((cookie, info_of(state, &principal, session).await?))
}

/// What the page learns of `session`: who it acts as, its CSRF token and
/// what the roles allow (for the page to offer only that).
async fn info_of(
    state: &Shared,
    principal: &Principal,
    session: ConsoleSession,
) -> Result<ConsoleSessionInfo, ApiError> {
    Ok(ConsoleSessionInfo {
        subject: principal.subject(),
        csrf: session.csrf,
        expires_at: session.expires_at,
        rules: rules_of(state, principal.kind, &principal.name).await?,
    })
}

/// The caller's live session (by its cookie) and who it acts for; the
/// caller's address is held to the same rate of failures as any other
/// authentication.
async fn signed_in(
    state: &Shared,
    caller: &Caller,
) -> Result<(ConsoleSession, Principal), ApiError> {
    check_not_limited(state, caller)?;
    let cookie = session_cookie(&caller.headers).ok_or_else(no_session)?;
    let session = live_session(state, caller, &cookie).await?;
    let principal = authenticate_token(state, caller, &session.token_hash).await?;
    Ok((session, principal))
}

/// `GET /ui/session`: the session of the caller's cookie, as the page
/// learns it after a reload.
async fn session_info(State(state): State<AppState>, caller: Caller) -> Response {
    let info = async {
        let (session, principal) = signed_in(&state, &caller).await?;
        info_of(&state, &principal, session).await
    };
    hardened(match info.await {
        Ok(info) => axum::Json(info).into_response(),
        Err(e) => e.into_response(),
    })
}

/// `DELETE /ui/session`: signs out (the session ends here and for every
/// controller sharing the database).
async fn sign_out(State(state): State<AppState>, caller: Caller) -> Response {
    let ended = async {
        let (session, principal) = signed_in(&state, &caller).await?;
        state.store.delete_console_session(&session.id_hash).await?;
        Ok::<_, ApiError>(principal.subject())
    };
    hardened(match ended.await {
        Ok(subject) => {
            let mut response = (
                StatusCode::NO_CONTENT,
                Audited::on("session").by(subject),
                (),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, cookie_header("", 0));
            response
        }
        Err(e) => e.into_response(),
    })
}

fn no_session() -> ApiError {
    ApiError::unauthorized("unauthorized: no console session; sign in at /ui")
}
