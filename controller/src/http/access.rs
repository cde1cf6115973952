//! Who may call each route and what its success records, declared once
//! per route ([`Policy`]) where the routes are listed, and applied by
//! [`Routes::add`] around the handler:
//!
//! 1. before it, the caller is authenticated (an API token or a node JWT)
//!    and, for admin routes, its roles must allow the route's verb on its
//!    resource; every refusal is audited with its reason ([`super::auth`]);
//! 2. after it, a route declared [`audited`](Policy::audited) records its
//!    action by the caller, on what the handler names in its answer
//!    ([`Audited`]): every success, and a change whose answer could not be
//!    read back.
//!
//! Handlers get the caller's [`Subject`], an admin route the rules the
//! caller [`Held`], and a node route its [`CallingNode`], as extractors.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, IntoResponseParts, Response, ResponseParts};
use axum::routing::MethodRouter;
use axum::{RequestExt, Router};
use comsat_protocol::api::{NodeKind, Rule};

use super::AppState;
use super::auth::{auth_node, authenticate_api, check_permission};
use crate::audit::{Caller, Outcome};
use crate::state::ApiError;
use crate::store::NodeRecord;

/// Names the resource of a request from its JSON body.
type ResourceOfBody = fn(&[u8]) -> Result<String, ApiError>;

/// Who may call a route.
#[derive(Clone, Copy, Debug)]
enum Access {
    /// Anyone: the handler checks what it needs (a join token).
    Public,
    /// A node of this kind, by a fresh JWT.
    Node(NodeKind),
    /// A user or service account whose roles allow `verb` on `resource`.
    Api {
        resource: Resource,
        verb: &'static str,
    },
}

/// What an admin route acts on, as roles name it.
#[derive(Clone, Copy)]
enum Resource {
    /// Always the same resource.
    Named(&'static str),
    /// A resource the request body names: read once the caller is
    /// authenticated, so a stranger learns nothing from the parser.
    OfBody(ResourceOfBody),
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named(r) => write!(f, "{r:?}"),
            Self::OfBody(_) => f.write_str("<named by the body>"),
        }
    }
}

/// One route's declaration: who may call it, and the audit action its
/// success records.
#[derive(Clone, Debug)]
pub(super) struct Policy {
    access: Access,
    audit: Option<Cow<'static, str>>,
}

impl Policy {
    /// Anyone may call it.
    pub(super) const fn public() -> Self {
        Self {
            access: Access::Public,
            audit: None,
        }
    }

    /// Only a node of `kind` may call it; the handler gets it as
    /// [`CallingNode`].
    pub(super) const fn node(kind: NodeKind) -> Self {
        Self {
            access: Access::Node(kind),
            audit: None,
        }
    }

    /// A user or service account whose roles allow `verb` on `resource`.
    pub(super) const fn api(resource: &'static str, verb: &'static str) -> Self {
        Self {
            access: Access::Api {
                resource: Resource::Named(resource),
                verb,
            },
            audit: None,
        }
    }

    /// A user or service account whose roles allow `verb` on the resource
    /// `resource` finds in the request body.
    pub(super) const fn api_on_body(resource: ResourceOfBody, verb: &'static str) -> Self {
        Self {
            access: Access::Api {
                resource: Resource::OfBody(resource),
                verb,
            },
            audit: None,
        }
    }

    /// Every success records `action`, by the caller, on what the handler
    /// names ([`Audited`]).
    pub(super) fn audited(mut self, action: impl Into<Cow<'static, str>>) -> Self {
        self.audit = Some(action.into());
        self
    }
}

/// The router being built: every route goes in with its [`Policy`], and
/// in the table of (path, method) the API's description is checked
/// against.
pub(super) struct Routes {
    router: Router<AppState>,
    state: AppState,
    table: Vec<(String, &'static str)>,
}

/// One method's handler at a route, named for the route table.
pub(super) struct Handler(&'static str, MethodRouter<AppState>);

macro_rules! methods {
    ($($method:ident),*) => {$(
        /// The handler of this method, named for the route table.
        pub(super) fn $method<H, T>(handler: H) -> Handler
        where
            H: axum::handler::Handler<T, AppState>,
            T: 'static,
        {
            Handler(stringify!($method), axum::routing::$method(handler))
        }
    )*};
}
methods!(get, post, put, patch, delete);

impl Handler {
    /// `router`, already made (with layers of its own), serving `method`.
    pub(super) fn of(method: &'static str, router: MethodRouter<AppState>) -> Self {
        Self(method, router)
    }
}

impl Routes {
    pub(super) fn new(state: &AppState) -> Self {
        Self {
            router: Router::new(),
            state: state.clone(),
            table: Vec::new(),
        }
    }

    /// Serves `handler` at `path`, behind `policy`.
    pub(super) fn add(mut self, path: &str, policy: Policy, handler: Handler) -> Self {
        let Handler(method, handler) = handler;
        let guard = middleware::from_fn_with_state((self.state.clone(), Arc::new(policy)), guard);
        self.table.push((path.to_owned(), method));
        Self {
            router: self.router.route(path, handler.route_layer(guard)),
            state: self.state,
            table: self.table,
        }
    }

    pub(super) fn into_router(self) -> Router<AppState> {
        self.router
    }

    /// Every (path, method) served.
    pub(super) fn table(&self) -> Vec<(String, &'static str)> {
        self.table.clone()
    }
}

/// The authenticated caller as audit records name it: `user:NAME`,
/// `serviceaccount:NAME`, `relay:NAME`, `agent:NAME`, or `anonymous` on a
/// public route.
#[derive(Clone, Debug)]
pub(super) struct Subject(pub(super) String);

/// The node that called a route declared [`Policy::node`].
#[derive(Clone, Debug)]
pub(super) struct CallingNode(pub(super) NodeRecord);

/// The rules a user or service account holds (every role bound to it),
/// for the handlers that must not give away more than that.
#[derive(Clone, Debug)]
pub(super) struct Held(pub(super) Vec<Rule>);

impl<S: Send + Sync> FromRequestParts<S> for Subject {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        guarded(parts, "Subject")
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Held {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        guarded(parts, "Held")
    }
}

/// What the route's guard put in the request for its handler.
fn guarded<T: Clone + Send + Sync + 'static>(parts: &Parts, what: &str) -> Result<T, ApiError> {
    parts
        .extensions
        .get::<T>()
        .cloned()
        .ok_or_else(|| unguarded(what))
}

impl<S: Send + Sync> FromRequestParts<S> for CallingNode {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .remove::<Self>()
            .ok_or_else(|| unguarded("CallingNode"))
    }
}

fn unguarded(what: &str) -> ApiError {
    ApiError::internal(
        "routing",
        format!("a handler wants {what}, which its route's policy does not give"),
    )
}

/// What a successful request changed, for its route's audit record: a
/// part of the handler's answer.
#[derive(Clone, Debug)]
pub(super) struct Audited {
    resource: String,
    reason: Option<String>,
    subject: Option<String>,
}

impl Audited {
    /// The request changed `resource` (`link/NAME`, `role/NAME`, …).
    pub(super) fn on(resource: impl Into<String>) -> Self {
        Self {
            resource: resource.into(),
            reason: None,
            subject: None,
        }
    }

    /// With a detail in the record's reason.
    pub(super) fn detail(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Done in the name of `subject` rather than the caller's (an
    /// enrolment: the node it enrolled).
    pub(super) fn by(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
}

impl IntoResponseParts for Audited {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// Applies a route's [`Policy`] around its handler.
async fn guard(
    State((state, policy)): State<(AppState, Arc<Policy>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let Ok(caller) = request.extract_parts::<Caller>().await;
    let (request, subject) = match admit(&state, policy.access, &caller, request).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let mut response = next.run(request).await;
    let done = response.extensions_mut().remove::<Audited>();
    let Some(action) = &policy.audit else {
        if let Some(done) = done {
            tracing::error!(path = %caller.path, resource = %done.resource, "a handler named what it changed, but its route records no audit action");
        }
        return response;
    };
    // A change is recorded even when reading the answer back failed.
    let done = match done {
        Some(done) => done,
        None if response.status().is_success() => {
            tracing::error!(%action, path = %caller.path, "a handler named nothing for its audit record; recording the path");
            Audited::on(caller.path.clone())
        }
        None => return response,
    };
    state
        .audit(
            &caller,
            done.subject.as_deref().unwrap_or(&subject),
            action,
            &done.resource,
            Outcome::Ok,
            done.reason.as_deref(),
        )
        .await;
    response
}

/// Lets the caller in under `access`: the request, with the caller's
/// [`Subject`] (and [`CallingNode`]) in it, and the subject; or the
/// refusal.
async fn admit(
    state: &AppState,
    access: Access,
    caller: &Caller,
    mut request: Request,
) -> Result<(Request, String), Response> {
    let subject = match access {
        Access::Public => "anonymous".to_owned(),
        Access::Node(kind) => {
            let node = auth_node(state, caller, kind).await.map_err(refusal)?;
            let subject = format!("{}:{}", node.kind, node.name);
            request.extensions_mut().insert(CallingNode(node));
            subject
        }
        Access::Api { resource, verb } => {
            let principal = authenticate_api(state, caller).await.map_err(refusal)?;
            let resource = match resource {
                Resource::Named(r) => Cow::Borrowed(r),
                Resource::OfBody(name) => {
                    let (buffered, body) = buffer_body(request).await?;
                    request = buffered;
                    Cow::Owned(name(&body).map_err(refusal)?)
                }
            };
            let (subject, held) = check_permission(state, caller, &principal, &resource, verb)
                .await
                .map_err(refusal)?;
            request.extensions_mut().insert(Held(held));
            subject
        }
    };
    request.extensions_mut().insert(Subject(subject.clone()));
    Ok((request, subject))
}

fn refusal(e: ApiError) -> Response {
    e.into_response()
}

/// Reads the body (within the router's body limit, refused as the
/// handler's own extractor would) and puts it back for the handler.
async fn buffer_body(request: Request) -> Result<(Request, Bytes), Response> {
    let (parts, body) = request.into_parts();
    let mut limited = Request::new(body);
    // The body limit travels in the extensions.
    *limited.extensions_mut() = parts.extensions.clone();
    let bytes = Bytes::from_request(limited, &())
        .await
        .map_err(IntoResponse::into_response)?;
    Ok((Request::from_parts(parts, Body::from(bytes.clone())), bytes))
}
