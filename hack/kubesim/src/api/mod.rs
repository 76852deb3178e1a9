//! The Kubernetes API over HTTP: discovery, the verbs on every resource type, watches, tables.
//!
//! ```text
//!  request ─▶ route (path → resource type, namespace, name, subresource) ─▶ verb
//!  write verbs: decode ─▶ patch ─▶ defaults ─▶ admission webhooks ─▶ schema ─▶ store (unless dryRun)
//! ```

pub mod defaults;
mod openapi;
pub mod status;
pub(crate) mod table;
mod watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::resources::{Registry, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ResourceKey, Served, Store};
pub use status::ApiError;

/// The body type of every answer.
pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted (the apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Who is calling: from the client certificate (CN, O), as the apiserver's x509 authenticator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    pub fn anonymous() -> Self {
        Self {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
        }
    }
}

/// A write about to be stored, for the admission chain.
#[derive(Debug)]
pub struct Write<'a> {
    pub resource: &'a ResourceType,
    pub operation: &'static str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub subresource: Option<&'a str>,
    pub user: &'a User,
    pub object: Value,
    pub old_object: Option<Arc<Value>>,
    pub dry_run: bool,
}

/// The admission chain a write passes through before it is stored (mutating webhooks).
pub trait Admission: Send + Sync {
    /// Returns the object to store, or the error that refuses the write.
    fn admit<'a>(
        &'a self,
        write: Write<'a>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send + 'a>>;
}

/// Decides whether a user may do a verb (RBAC).
pub trait Authorizer: Send + Sync {
    /// `Err(reason)` when the request is forbidden.
    fn authorize(
        &self,
        user: &User,
        verb: &str,
        resource: &ResourceType,
        subresource: Option<&str>,
        namespace: &str,
        name: &str,
    ) -> Result<(), String>;
}

/// The API server's state.
pub struct Api {
    pub store: Arc<Store>,
    registry: RwLock<Registry>,
    admission: RwLock<Option<Arc<dyn Admission>>>,
    authorizer: RwLock<Option<Arc<dyn Authorizer>>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The parts of a resource URL.
#[derive(Debug)]
struct Target {
    resource: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Api {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            registry: RwLock::new(Registry::new()),
            admission: RwLock::new(None),
            authorizer: RwLock::new(None),
        }
    }

    pub fn set_admission(&self, admission: Arc<dyn Admission>) {
        *self.admission.write().unwrap_or_else(PoisonError::into_inner) = Some(admission);
    }

    pub fn set_authorizer(&self, authorizer: Arc<dyn Authorizer>) {
        *self.authorizer.write().unwrap_or_else(PoisonError::into_inner) = Some(authorizer);
    }

    /// A snapshot of the served resource types.
    pub fn registry(&self) -> Registry {
        self.registry.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// One served type, without copying the registry.
    pub fn resource_type(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(group, version, plural)
    }

    /// Answers one HTTP request from `user`.
    pub async fn handle(self: Arc<Self>, user: User, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let query = parse_query(parts.uri.query().unwrap_or_default());
        let path: Vec<&str> = parts
            .uri
            .path()
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (result, warnings) = crate::admission::WARNINGS
            .scope(std::cell::RefCell::new(Vec::new()), async {
                let result = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
                    Ok(collected) => self.route(&user, &parts, &path, &query, collected.to_bytes()).await,
                    Err(_) => Err(ApiError::new(
                        413,
                        "RequestEntityTooLarge",
                        "the request body is too large",
                    )),
                };
                (result, crate::admission::WARNINGS.with(|w| w.take()))
            })
            .await;
        match result {
            Ok(mut response) => {
                // As the apiserver relays webhook warnings: `Warning: 299 - "text"`, which kubectl prints.
                for w in warnings {
                    let text = format!("299 - \"{}\"", w.replace('"', "'"));
                    if let Ok(v) = header::HeaderValue::from_str(&text) {
                        response.headers_mut().append(header::WARNING, v);
                    }
                }
                response
            }
            Err(e) => {
                tracing::debug!(method = %parts.method, path = %parts.uri.path(), code = e.code, message = %e.message, "request failed");
                json_response(
                    StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &e.to_status(),
                )
            }
        }
    }

    async fn route(
        &self,
        user: &User,
        parts: &http::request::Parts,
        path: &[&str],
        query: &HashMap<String, String>,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        match path {
            [] => Ok(ok(
                &json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]}),
            )),
            ["healthz" | "livez" | "readyz", ..] => Ok(text(StatusCode::OK, "ok")),
            ["version"] => Ok(ok(&json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-kubesim", "gitCommit": "kubesim",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                "compiler": "gc", "platform": "linux/amd64"
            }))),
            ["api"] => Ok(ok(&json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}))),
            ["apis"] => Ok(ok(&self.group_list())),
            ["openapi", "v3"] => Ok(ok(&openapi::root(&self.registry()))),
            ["openapi", "v3", "api", version] => openapi::group_version(&self.registry(), "", version)
                .map(|d| ok(&d))
                .ok_or_else(ApiError::path_not_found),
            ["openapi", "v3", "apis", group, version] => openapi::group_version(&self.registry(), group, version)
                .map(|d| ok(&d))
                .ok_or_else(ApiError::path_not_found),
            ["api", "v1"] => Ok(ok(&self.resource_list("", "v1"))),
            ["apis", group] => self.group(group).map(|g| ok(&g)),
            ["apis", group, version] => {
                let list = self.resource_list(group, version);
                if list["resources"].as_array().is_some_and(Vec::is_empty) {
                    Err(ApiError::path_not_found())
                } else {
                    Ok(ok(&list))
                }
            }
            ["api", "v1", rest @ ..] => self.resource(user, parts, "", "v1", rest, query, body).await,
            ["apis", group, version, rest @ ..] => self.resource(user, parts, group, version, rest, query, body).await,
            _ => Err(ApiError::path_not_found()),
        }
    }

    fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .registry()
            .groups()
            .into_iter()
            .map(|(name, versions)| group_object(&name, &versions))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    fn group(&self, group: &str) -> Result<Value, ApiError> {
        let groups = self.registry().groups();
        let versions = groups.get(group).ok_or_else(ApiError::path_not_found)?;
        let mut g = group_object(group, versions);
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        Ok(g)
    }

    fn resource_list(&self, group: &str, version: &str) -> Value {
        let resources: Vec<Value> = self
            .registry()
            .all()
            .filter(|t| t.group == group && t.version == version)
            .flat_map(|t| t.discovery())
            .collect();
        let gv = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
    }

    fn target(&self, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        let lookup = |plural: &str| {
            registry
                .get(group, version, plural)
                .ok_or_else(ApiError::path_not_found)
        };
        let s = |x: &&str| Some((*x).to_owned());
        let namespaces_subresource = |x: &str| x == "status" || x == "finalize";
        let (resource, namespace, name, subresource) = match rest {
            // The Namespace object itself and its subresources.
            ["namespaces", name] if group.is_empty() => (lookup("namespaces")?, None, s(name), None),
            ["namespaces", name, sub] if group.is_empty() && namespaces_subresource(sub) => {
                (lookup("namespaces")?, None, s(name), s(sub))
            }
            ["namespaces", ns, plural] => (lookup(plural)?, s(ns), None, None),
            ["namespaces", ns, plural, name] => (lookup(plural)?, s(ns), s(name), None),
            ["namespaces", ns, plural, name, sub] => (lookup(plural)?, s(ns), s(name), s(sub)),
            [plural] => (lookup(plural)?, None, None, None),
            [plural, name] => (lookup(plural)?, None, s(name), None),
            [plural, name, sub] => (lookup(plural)?, None, s(name), s(sub)),
            _ => return Err(ApiError::path_not_found()),
        };
        if !resource.namespaced && namespace.is_some() {
            return Err(ApiError::path_not_found());
        }
        if resource.namespaced && namespace.is_none() && name.is_some() {
            return Err(ApiError::path_not_found());
        }
        match subresource.as_deref() {
            None => {}
            Some("status") if resource.status => {}
            Some("scale") if resource.scale => {}
            Some("finalize") if resource.plural == "namespaces" => {}
            Some(_) => return Err(ApiError::path_not_found()),
        }
        Ok(Target {
            resource,
            namespace,
            name,
            subresource,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn resource(
        &self,
        user: &User,
        parts: &http::request::Parts,
        group: &str,
        version: &str,
        rest: &[&str],
        query: &HashMap<String, String>,
        body: Bytes,
    ) -> Result<Response<Body>, ApiError> {
        let target = self.target(group, version, rest)?;
        let t = target.resource.clone();
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (&parts.method, &target.name) {
            (&Method::GET, None) if watching => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, None) => "create",
            (&Method::PUT, Some(_)) => "update",
            (&Method::PATCH, Some(_)) => "patch",
            (&Method::DELETE, Some(_)) => "delete",
            (&Method::DELETE, None) => "deletecollection",
            _ => return Err(ApiError::method_not_allowed()),
        };
        self.authorize(
            user,
            verb,
            &t,
            target.subresource.as_deref(),
            target.namespace.as_deref().unwrap_or_default(),
            target.name.as_deref().unwrap_or_default(),
        )?;
        let ns = target.namespace.clone().unwrap_or_default();
        let dry_run = query.get("dryRun").is_some_and(|d| d == "All");
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if content_type.contains("protobuf") || content_type.contains("cbor") {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "kubesim reads JSON only, not {content_type}; kubectl's create generators send protobuf: use `kubectl create ... --dry-run=client -o yaml | kubectl apply -f -`"
                ),
            ));
        }
        match verb {
            "watch" => {
                let labels = label_selector(query)?;
                let fields = field_selector(query)?;
                Ok(watch::serve(
                    self.store.clone(),
                    t,
                    target.namespace.clone(),
                    labels,
                    fields,
                    query,
                    wants_table(parts),
                ))
            }
            "list" => {
                let labels = label_selector(query)?;
                let fields = field_selector(query)?;
                let (items, rv) = self.store.list(&key(&t), target.namespace.as_deref());
                let items = items
                    .into_iter()
                    .filter(|o| labels.matches(&o["metadata"]["labels"]) && fields.matches(o));
                if wants_table(parts) {
                    let items: Vec<Value> = items.map(|o| served(&t, &o)).collect();
                    return Ok(ok(&table::table(&t, &items, rv, query)));
                }
                // Written straight from the stored objects, without copying them.
                let items: Vec<Arc<Value>> = items.collect();
                let api_version = t.api_version();
                let list = List {
                    kind: format!("{}List", t.kind),
                    api_version: &api_version,
                    metadata: json!({"resourceVersion": rv.to_string()}),
                    items: items
                        .iter()
                        .map(|o| Served {
                            object: o,
                            api_version: &api_version,
                            kind: &t.kind,
                        })
                        .collect(),
                };
                Ok(bytes_response(
                    StatusCode::OK,
                    serde_json::to_vec(&list).unwrap_or_default(),
                ))
            }
            "get" => {
                let name = target.name.as_deref().unwrap_or_default();
                let o = self
                    .store
                    .get(&key(&t), &ns, name)
                    .ok_or_else(|| ApiError::not_found(&t, name))?;
                let o = served(&t, &o);
                match target.subresource.as_deref() {
                    Some("scale") => Ok(ok(&scale_of(&o))),
                    _ if wants_table(parts) => Ok(ok(&table::table(&t, std::slice::from_ref(&o), 0, query))),
                    _ => Ok(ok(&o)),
                }
            }
            "create" => {
                let object = decode(&body)?;
                let created = self.create(user, &t, &ns, object, dry_run).await?;
                Ok(json_response(StatusCode::CREATED, &served(&t, &created)))
            }
            "update" => {
                let object = decode(&body)?;
                let name = target.name.clone().unwrap_or_default();
                let updated = self
                    .update(user, &t, &ns, &name, target.subresource.as_deref(), object, dry_run)
                    .await?;
                Ok(ok(&served_at(&t, &updated, target.subresource.as_deref())))
            }
            "patch" => {
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let name = target.name.clone().unwrap_or_default();
                let patched = self
                    .patch(
                        user,
                        &t,
                        &ns,
                        &name,
                        target.subresource.as_deref(),
                        content_type,
                        &body,
                        query,
                        dry_run,
                    )
                    .await?;
                Ok(ok(&served_at(&t, &patched, target.subresource.as_deref())))
            }
            "delete" => {
                let name = target.name.clone().unwrap_or_default();
                let options = if body.is_empty() { json!({}) } else { decode(&body)? };
                let (deleted, gone) = self.delete(&t, &ns, &name, &options, query, dry_run)?;
                let code = if gone { StatusCode::OK } else { StatusCode::ACCEPTED };
                Ok(json_response(code, &served(&t, &deleted)))
            }
            "deletecollection" => {
                let labels = label_selector(query)?;
                let (items, _) = self.store.list(&key(&t), target.namespace.as_deref());
                for o in items.iter().filter(|o| labels.matches(&o["metadata"]["labels"])) {
                    let name = o["metadata"]["name"].as_str().unwrap_or_default();
                    let _ = self.delete(&t, &ns, name, &json!({}), query, dry_run);
                }
                Ok(ok(&status::success(json!({"kind": t.plural}))))
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    fn authorize(
        &self,
        user: &User,
        verb: &str,
        t: &ResourceType,
        sub: Option<&str>,
        ns: &str,
        name: &str,
    ) -> Result<(), ApiError> {
        let authorizer = self.authorizer.read().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(authorizer) = authorizer else { return Ok(()) };
        authorizer
            .authorize(user, verb, t, sub, ns, name)
            .map_err(ApiError::forbidden)
    }

    /// Creates `object` in namespace `ns` as `user` would through the API (defaults, admission,
    /// validation), unless `dry_run`.
    ///
    /// # Errors
    ///
    /// What the apiserver would answer: a missing namespace, a name clash, an invalid object, a
    /// refusal by admission.
    pub async fn create(
        &self,
        user: &User,
        t: &ResourceType,
        ns: &str,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(t, &mut object)?;
        let meta = &mut object["metadata"];
        if !meta.is_object() {
            *meta = json!({});
        }
        if t.namespaced {
            match meta["namespace"].as_str() {
                Some(given) if given != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => meta["namespace"] = json!(ns),
            }
            let namespaces = ("".to_owned(), "namespaces".to_owned());
            match self.store.get(&namespaces, "", ns) {
                None => {
                    return Err(ApiError {
                        details: json!({"name": ns, "kind": "namespaces"}),
                        ..ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                    });
                }
                Some(n) if n["metadata"].get("deletionTimestamp").is_some() => {
                    return Err(ApiError::forbidden(format!(
                        "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        t.group_resource(),
                        meta["name"].as_str().unwrap_or_default()
                    )));
                }
                Some(_) => {}
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        if meta["name"].as_str().is_none_or(str::is_empty) {
            let prefix = meta["generateName"].as_str().unwrap_or_default().to_owned();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    t,
                    "",
                    vec![(
                        "FieldValueRequired".into(),
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
            meta["name"] = json!(format!("{prefix}{}", random_suffix(&self.store)));
        }
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        meta["uid"] = json!(self.store.new_uid());
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
            m.remove("managedFields");
        }
        if t.status && t.crd.is_none() && t.plural != "namespaces" {
            // The status of a new object is the controllers' to write.
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
        }
        let object = self
            .prepare(user, t, "CREATE", ns, &name, None, None, object, dry_run)
            .await?;
        if dry_run {
            return Ok(object);
        }
        let stored = self
            .store
            .create(&key(t), object)
            .map_err(|e| ApiError::from_store(e, t, &name))?;
        self.after_write(t, &stored);
        Ok((*stored).clone())
    }

    /// Defaults, admission and validation of an object about to be written.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        user: &User,
        t: &ResourceType,
        operation: &'static str,
        ns: &str,
        name: &str,
        subresource: Option<&str>,
        old: Option<Arc<Value>>,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if t.crd.is_none() {
            defaults::apply(&t.kind, &mut object);
        }
        let admission = self.admission.read().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(admission) = admission
            && subresource.is_none()
        {
            object = admission
                .admit(Write {
                    resource: t,
                    operation,
                    namespace: ns,
                    name,
                    subresource,
                    user,
                    object,
                    old_object: old,
                    dry_run,
                })
                .await?;
        }
        if let Some(schema) = t.crd.as_ref().and_then(|c| c.schema.as_ref()) {
            object = schema.admit(object).map_err(|errors| {
                ApiError::invalid(
                    t,
                    name,
                    errors
                        .into_iter()
                        .map(|e| (e.reason.to_owned(), e.field, e.message))
                        .collect(),
                )
            })?;
        }
        if t.plural == "customresourcedefinitions" {
            crate::resources::from_crd(&object).map_err(|e| {
                ApiError::invalid(
                    t,
                    name,
                    vec![("FieldValueInvalid".into(), "spec".into(), crate::report(&e))],
                )
            })?;
        }
        Ok(object)
    }

    /// Effects of a stored write on the API itself (a CRD serves its resource).
    fn after_write(&self, t: &ResourceType, object: &Value) {
        if t.plural == "customresourcedefinitions" && t.group == "apiextensions.k8s.io" {
            let mut registry = self.registry.write().unwrap_or_else(PoisonError::into_inner);
            if let Ok(types) = crate::resources::from_crd(object) {
                for rt in types {
                    registry.insert(rt);
                }
            }
        }
    }

    /// Replaces an object (or its status or scale).
    ///
    /// # Errors
    ///
    /// As the apiserver: not found, conflict, invalid, refused by admission.
    #[allow(clippy::too_many_arguments)]
    pub async fn update(
        &self,
        user: &User,
        t: &ResourceType,
        ns: &str,
        name: &str,
        subresource: Option<&str>,
        object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let stored = self
            .update_shared(user, t, ns, name, subresource, object, dry_run)
            .await?;
        Ok(match subresource {
            Some("scale") => scale_of(&stored),
            _ => Arc::unwrap_or_clone(stored),
        })
    }

    /// [`Api::update`], answering the stored object itself (not a Scale) without copying it.
    ///
    /// # Errors
    ///
    /// As [`Api::update`].
    #[allow(clippy::too_many_arguments)]
    pub async fn update_shared(
        &self,
        user: &User,
        t: &ResourceType,
        ns: &str,
        name: &str,
        subresource: Option<&str>,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self
            .store
            .get(&key(t), ns, name)
            .ok_or_else(|| ApiError::not_found(t, name))?;
        if subresource == Some("scale") {
            let replicas = object["spec"]["replicas"].clone();
            let mut next = (*old).clone();
            next["spec"]["replicas"] = replicas;
            object = next;
        } else {
            check_type(t, &mut object)?;
        }
        if object["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let expected_rv = object["metadata"]["resourceVersion"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let object = merge_system_fields(t, &old, object, subresource);
        let object = self
            .prepare(
                user,
                t,
                "UPDATE",
                ns,
                name,
                subresource,
                Some(old.clone()),
                object,
                dry_run,
            )
            .await?;
        let object = bump_generation(&old, object);
        if dry_run {
            return Ok(Arc::new(object));
        }
        let stored = self
            .store
            .update(&key(t), object, expected_rv.as_deref())
            .map_err(|e| ApiError::from_store(e, t, name))?;
        self.after_write(t, &stored);
        self.finish_if_finalized(t, &stored);
        Ok(stored)
    }

    /// Applies a patch of `content_type` to an object, then writes it as an update.
    ///
    /// # Errors
    ///
    /// An unknown patch type (415), a patch that does not apply (422), and what an update answers.
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        user: &User,
        t: &ResourceType,
        ns: &str,
        name: &str,
        subresource: Option<&str>,
        content_type: &str,
        body: &[u8],
        _query: &HashMap<String, String>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let patch: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the patch body is not JSON: {e}")))?;
        // As the apiserver, a patch that does not name a resourceVersion is applied again to the newest
        // object when another write came in between (a controller's status, say): a conflict reaches
        // the client only if its patch named the version it was based on.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .patch_once(user, t, ns, name, subresource, media, &patch, dry_run)
                .await
            {
                Err((e, based_on_current)) if e.code == 409 && based_on_current && attempts < 16 => {}
                result => return result.map_err(|(e, _)| e),
            }
        }
    }

    /// One attempt of [`Api::patch`]; with an error, whether the patch was based on the object it
    /// read (named no other resourceVersion).
    #[allow(clippy::too_many_arguments)]
    async fn patch_once(
        &self,
        user: &User,
        t: &ResourceType,
        ns: &str,
        name: &str,
        subresource: Option<&str>,
        media: &str,
        patch: &Value,
        dry_run: bool,
    ) -> Result<Value, (ApiError, bool)> {
        let patch = patch.clone();
        let Some(current) = self.store.get(&key(t), ns, name) else {
            if media == "application/apply-patch+yaml" {
                // Server-side apply of an object that does not exist creates it.
                return self.create(user, t, ns, patch, dry_run).await.map_err(|e| (e, false));
            }
            return Err((ApiError::not_found(t, name), false));
        };
        let base = if subresource == Some("scale") {
            scale_of(&current)
        } else {
            served(t, &current)
        };
        let invalid = |e: String| (ApiError::new(422, "Invalid", e), false);
        let mut patched = match media {
            "application/json-patch+json" => {
                let p: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| (ApiError::bad_request(format!("invalid JSON patch: {e}")), false))?;
                let mut doc = base;
                json_patch::patch(&mut doc, &p).map_err(|e| invalid(format!("the JSON patch does not apply: {e}")))?;
                doc
            }
            "application/merge-patch+json" => {
                let mut doc = base;
                json_patch::merge(&mut doc, &patch);
                doc
            }
            "application/strategic-merge-patch+json" => {
                if !t.strategic_merge() {
                    return Err((ApiError::unsupported_media_type(media), false));
                }
                crate::patch::strategic::apply(&t.kind, &base, &patch).map_err(|e| invalid(crate::report(&e)))?
            }
            "application/apply-patch+yaml" => {
                // Approximation: apply as a merge (strategic for built-ins), without field ownership.
                if t.strategic_merge() {
                    crate::patch::strategic::apply(&t.kind, &base, &patch).map_err(|e| invalid(crate::report(&e)))?
                } else {
                    let mut doc = base;
                    json_patch::merge(&mut doc, &patch);
                    doc
                }
            }
            other => return Err((ApiError::unsupported_media_type(other), false)),
        };
        if subresource == Some("scale") {
            let mut next = (*current).clone();
            next["spec"]["replicas"] = patched["spec"]["replicas"].clone();
            patched = next;
        }
        // A patch is based on the current object unless it names a resourceVersion itself.
        let based_on_current = patched["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
            || patched["metadata"]["resourceVersion"].is_null();
        if based_on_current {
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        }
        if subresource == Some("scale") {
            let updated = self
                .update(user, t, ns, name, None, patched, dry_run)
                .await
                .map_err(|e| (e, based_on_current))?;
            return Ok(scale_of(&updated));
        }
        self.update(user, t, ns, name, subresource, patched, dry_run)
            .await
            .map_err(|e| (e, based_on_current))
    }

    /// Deletes an object: at once, or by marking it when finalizers or a grace period hold it.
    /// Returns the object and whether it is gone.
    ///
    /// # Errors
    ///
    /// Not found, or a failed precondition.
    pub fn delete(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        options: &Value,
        query: &HashMap<String, String>,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let k = key(t);
        let current = self
            .store
            .get(&k, ns, name)
            .ok_or_else(|| ApiError::not_found(t, name))?;
        let expected_uid = options["preconditions"]["uid"].as_str();
        if let Some(rv) = options["preconditions"]["resourceVersion"].as_str()
            && current["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::conflict(t, name));
        }
        if dry_run {
            return Ok(((*current).clone(), true));
        }
        let grace = options["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
        let propagation = options["propagationPolicy"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| query.get("propagationPolicy").cloned())
            .unwrap_or_else(|| "Background".into());
        let has_finalizers = current["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let is_pod = t.group.is_empty() && t.plural == "pods";
        let pod_grace = if is_pod {
            grace.unwrap_or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30))
        } else {
            0
        };
        if has_finalizers || (is_pod && pod_grace > 0) || (t.plural == "namespaces" && t.group.is_empty()) {
            if current["metadata"].get("deletionTimestamp").is_some() && !(is_pod && grace == Some(0)) {
                return Ok(((*current).clone(), false));
            }
            let mut marked = (*current).clone();
            if is_pod && grace == Some(0) && !has_finalizers {
                let gone = self
                    .store
                    .delete(&k, ns, name, expected_uid)
                    .map_err(|e| ApiError::from_store(e, t, name))?;
                return Ok(((*gone).clone(), true));
            }
            marked["metadata"]["deletionTimestamp"] = json!(now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(pod_grace);
            if t.plural == "namespaces" && t.group.is_empty() {
                marked["status"]["phase"] = json!("Terminating");
            }
            if propagation == "Orphan" {
                push_finalizer(&mut marked, "orphan");
            } else if propagation == "Foreground" {
                push_finalizer(&mut marked, "foregroundDeletion");
            }
            let stored = self
                .store
                .update(&k, marked, None)
                .map_err(|e| ApiError::from_store(e, t, name))?;
            return Ok(((*stored).clone(), false));
        }
        match propagation.as_str() {
            "Orphan" => self.orphan_dependents(&current),
            "Foreground" => {
                let mut marked = (*current).clone();
                marked["metadata"]["deletionTimestamp"] = json!(now());
                push_finalizer(&mut marked, "foregroundDeletion");
                let stored = self
                    .store
                    .update(&k, marked, None)
                    .map_err(|e| ApiError::from_store(e, t, name))?;
                return Ok(((*stored).clone(), false));
            }
            _ => {}
        }
        let gone = self
            .store
            .delete(&k, ns, name, expected_uid)
            .map_err(|e| ApiError::from_store(e, t, name))?;
        if t.plural == "customresourcedefinitions" {
            let group = gone["spec"]["group"].as_str().unwrap_or_default();
            let plural = gone["spec"]["names"]["plural"].as_str().unwrap_or_default();
            self.registry
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove_custom(group, plural);
        }
        Ok(((*gone).clone(), true))
    }

    /// An object marked for deletion whose last finalizer was just removed is deleted.
    fn finish_if_finalized(&self, t: &ResourceType, object: &Value) {
        let marked = object["metadata"].get("deletionTimestamp").is_some();
        let free = object["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
        let is_pod = t.group.is_empty() && t.plural == "pods";
        if marked && free && !is_pod && !(t.group.is_empty() && t.plural == "namespaces") {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let _ = self.store.delete(&key(t), ns, name, None);
        }
    }

    fn orphan_dependents(&self, owner: &Value) {
        let Some(uid) = owner["metadata"]["uid"].as_str() else {
            return;
        };
        for (resource, o) in self.store.dependents(uid) {
            let refs = o["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
            let mut next = (*o).clone();
            let kept: Vec<Value> = refs.into_iter().filter(|r| r["uid"] != uid).collect();
            next["metadata"]["ownerReferences"] = json!(kept);
            let _ = self.store.update(&resource, next, None);
        }
    }
}

fn push_finalizer(o: &mut Value, f: &str) {
    let list = &mut o["metadata"]["finalizers"];
    if !list.is_array() {
        *list = json!([]);
    }
    if let Some(a) = list.as_array_mut()
        && !a.iter().any(|x| x == f)
    {
        a.push(json!(f));
    }
}

fn group_object(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

/// The storage key of a resource type.
pub fn key(t: &ResourceType) -> ResourceKey {
    (t.group.clone(), t.plural.clone())
}

/// An object as served at `t`'s version.
fn served(t: &ResourceType, o: &Value) -> Value {
    let mut o = o.clone();
    o["apiVersion"] = json!(t.api_version());
    o["kind"] = json!(t.kind);
    o
}

/// An answer of a write: the object as served, or a Scale as it is.
fn served_at(t: &ResourceType, o: &Value, subresource: Option<&str>) -> Value {
    if subresource == Some("scale") {
        o.clone()
    } else {
        served(t, o)
    }
}

fn check_type(t: &ResourceType, object: &mut Value) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    match object["kind"].as_str() {
        Some(kind) if kind != t.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind {kind:?} of the body does not match the resource {}",
                t.plural
            )));
        }
        _ => object["kind"] = json!(t.kind),
    }
    object["apiVersion"] = json!(t.api_version());
    Ok(())
}

/// Fields a client cannot change with an update: identity, creation, and (through the main resource)
/// the status of types with a status subresource; through `/status`, everything but the status.
fn merge_system_fields(t: &ResourceType, old: &Value, mut object: Value, subresource: Option<&str>) -> Value {
    if subresource == Some("status") {
        // The old object but its status, which is replaced (not copied only to be dropped).
        let mut next = match old.as_object() {
            Some(fields) => Value::Object(
                fields
                    .iter()
                    .filter(|(k, _)| *k != "status")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            None => old.clone(),
        };
        next["status"] = object["status"].take();
        if let Some(rv) = object["metadata"].get("resourceVersion") {
            next["metadata"]["resourceVersion"] = rv.clone();
        }
        return next;
    }
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(v) => object["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = object["metadata"].as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if let Some(m) = object["metadata"].as_object_mut() {
        m.remove("managedFields");
        if old["metadata"]["namespace"].is_string() {
            m.insert("namespace".into(), old["metadata"]["namespace"].clone());
        }
    }
    if t.status && t.plural != "namespaces" {
        match old.get("status") {
            Some(s) => object["status"] = s.clone(),
            None => {
                if let Some(o) = object.as_object_mut() {
                    o.remove("status");
                }
            }
        }
    }
    object
}

/// `metadata.generation` grows when anything but metadata and status changes.
fn bump_generation(old: &Value, mut object: Value) -> Value {
    const OUTSIDE: [&str; 4] = ["metadata", "status", "apiVersion", "kind"];
    let changed = match (old.as_object(), object.as_object()) {
        (Some(a), Some(b)) => {
            let spec = |m: &'_ serde_json::Map<String, Value>| {
                m.iter().filter(|(k, _)| !OUTSIDE.contains(&k.as_str())).count()
            };
            spec(a) != spec(b)
                || a.iter()
                    .filter(|(k, _)| !OUTSIDE.contains(&k.as_str()))
                    .any(|(k, v)| b.get(k) != Some(v))
        }
        _ => old != &object,
    };
    if changed {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        object["metadata"]["generation"] = json!(g);
    }
    object
}

/// The `autoscaling/v1` Scale of a Deployment or ReplicaSet.
fn scale_of(o: &Value) -> Value {
    let labels: Vec<String> = o["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"], "uid": o["metadata"]["uid"],
            "resourceVersion": o["metadata"]["resourceVersion"], "creationTimestamp": o["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": o["spec"]["replicas"]},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": labels.join(",")},
    })
}

fn decode(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
}

fn label_selector(query: &HashMap<String, String>) -> Result<LabelSelector, ApiError> {
    LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn field_selector(query: &HashMap<String, String>) -> Result<FieldSelector, ApiError> {
    FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn wants_table(parts: &http::request::Parts) -> bool {
    parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// The current time as the API writes it.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn random_suffix(store: &Store) -> String {
    // Five characters of the apiserver's alphabet, from a fresh uid (unique within the store).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let uid = store.new_uid();
    let mut n: u64 = uid.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1099511628211)
    });
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A list as served.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    kind: String,
    api_version: &'a str,
    metadata: Value,
    items: Vec<Served<'a>>,
}

/// A JSON answer.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    bytes_response(status, serde_json::to_vec(value).unwrap_or_default())
}

/// A JSON answer already encoded.
fn bytes_response(status: StatusCode, json: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(json));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn ok(value: &Value) -> Response<Body> {
    json_response(StatusCode::OK, value)
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier%21%3Ddb&watch=true&x=a+b");
        assert_eq!(q["labelSelector"], "app=web,tier!=db");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "a b");
    }

    #[test]
    fn generation_grows_only_when_the_spec_changes() {
        let old = json!({"metadata": {"generation": 3, "labels": {"a": "1"}}, "spec": {"replicas": 1}, "status": {}});
        let relabeled =
            json!({"metadata": {"generation": 3, "labels": {"a": "2"}}, "spec": {"replicas": 1}, "status": {"x": 1}});
        assert_eq!(bump_generation(&old, relabeled)["metadata"]["generation"], 3);
        let scaled = json!({"metadata": {"generation": 3}, "spec": {"replicas": 2}});
        assert_eq!(bump_generation(&old, scaled)["metadata"]["generation"], 4);
        let emptied = json!({"metadata": {"generation": 3}, "status": {}});
        assert_eq!(bump_generation(&old, emptied)["metadata"]["generation"], 4);
        let grown = json!({"apiVersion": "v1", "metadata": {"generation": 3}, "spec": {"replicas": 1}, "data": {}});
        assert_eq!(bump_generation(&old, grown)["metadata"]["generation"], 4);
        let same = json!({"apiVersion": "v1", "kind": "X", "metadata": {"generation": 3}, "spec": {"replicas": 1}});
        assert_eq!(bump_generation(&old, same)["metadata"]["generation"], 3);
    }
}
