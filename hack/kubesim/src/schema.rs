//! Custom resources against their CRD's structural schema: defaulting, pruning, validation.
//!
//! [`Schema::new`] compiles a CRD version's `schema.openAPIV3Schema`; [`Schema::admit`] does to a custom
//! resource what kube-apiserver does to it on create and update before it is stored:
//!
//! 1. pruning (`k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning`): every field the schema does not
//!    declare is dropped, except below `x-kubernetes-preserve-unknown-fields: true` and except `apiVersion`,
//!    `kind` (when strings) and `metadata` at the root;
//! 2. null pruning (`defaulting.PruneNonNullableNullsWithoutDefaults`): a `null` for a field that is neither
//!    `nullable` nor has a `default` is dropped, as if it had not been sent;
//! 3. defaulting (`defaulting.Default`): a missing field, or a `null` for a non-nullable field, gets a copy of
//!    its `default`, recursively, also inside array items and map values;
//! 4. validation: the OpenAPI validation of kube-openapi (`pkg/validation/validate`) with its errors converted
//!    the way `apiextensions-apiserver/pkg/apiserver/validation.ValidateCustomResource` converts them, then
//!    the `x-kubernetes-list-type` `set`/`map` uniqueness checks (`schema/listtype`), then — when the schema
//!    has CEL rules and a blocking error was found — the apiserver's "some validation rules were not
//!    checked" error.
//!
//! The apiserver runs pruning in its decoder and defaulting right after it; the result is the same as
//! defaulting first, because a default never holds a field the schema does not declare (defaults are pruned
//! here when the schema is compiled, as the apiserver does when it serves a CRD).
//!
//! # Keywords
//!
//! Enforced: `type` (`object`, `array`, `string`, `integer` — JSON integers, or floats with an integral value
//! such as `1.0` —, `number`, `boolean`), `nullable`, `x-kubernetes-int-or-string`, `properties`,
//! `additionalProperties` (schema or bool), `items`, `required`, `enum`, `maxLength`/`minLength` (counted in
//! characters, as Go counts runes), `pattern` (Rust `regex`, unanchored like Go's `MatchString`),
//! `maximum`/`minimum`/`exclusiveMaximum`/`exclusiveMinimum`, `multipleOf`, `maxItems`/`minItems`,
//! `uniqueItems`, `maxProperties`/`minProperties`, `allOf`/`anyOf`/`oneOf`/`not` (value validations: the
//! sub-schemas only constrain), `default`, `x-kubernetes-preserve-unknown-fields`,
//! `x-kubernetes-embedded-resource` (for pruning only), `x-kubernetes-list-type: set|map` with
//! `x-kubernetes-list-map-keys`, and `format` the way the apiserver does: formats it does not support
//! (`int32`, `int64`, `double`, `float`, ...) are ignored, `byte`, `date`, `date-time`, `ipv4`, `ipv6`, `cidr`,
//! `uuid`, `uuid3`, `uuid4`, `uuid5` and `hexcolor` are checked, and the other supported ones (`uri`, `email`,
//! `hostname`, `mac`, `isbn*`, `creditcard`, `ssn`, `rgbcolor`, `bsonobjectid`, `duration`, `password`) accept
//! any string.
//!
//! Not enforced: `x-kubernetes-validations` (CEL rules are counted, see [`Schema::unenforced_cel_rules`], but
//! not evaluated), `x-kubernetes-map-type` and `x-kubernetes-list-type: atomic` (they only matter to
//! server-side apply), `description`, `title`, `example`, `externalDocs`. `$ref`, `patternProperties`,
//! `dependencies`, `definitions`, `additionalItems`, `id` and `$schema` make [`Schema::new`] fail, as the
//! apiserver refuses them in a CRD.
//!
//! # Differences from upstream
//!
//! - CEL rules are not evaluated (only their blocking error is reproduced); there is no validation ratcheting
//!   of unchanged fields on update; `metadata` is neither pruned, defaulted nor validated here.
//! - Errors come in a stable order (properties by name); the apiserver walks Go maps, so its order varies.
//! - Where `oneOf`/`anyOf` fail with no valid alternative, kube-openapi also reports the errors of the
//!   alternative that "matched most"; its match counting is reproduced closely but not proven identical.
//! - `pattern`s are Rust regexes: `\d`, `\w`, `\s` and `\b` are Unicode-aware, where RE2's are ASCII.
//! - `enum` compares JSON values with numbers by value; `uniqueItems` and list-type sets compare JSON values;
//!   neither reproduces Go's reflection quirks (e.g. `1.5` matching an `enum` of `1`).
//! - Too-long messages use current apimachinery's `may not be more than N bytes`.
//! - The structural-schema checks of [`Schema::new`] are a subset of the apiserver's CRD validation.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

/// One invalid field, as the apiserver reports it in a 422 `Status` (`details.causes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, `FieldValueTypeInvalid`, `FieldValueTooLong`, ... (upstream's CauseType strings)
    pub reason: &'static str,
    /// The field path as the apiserver writes it, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    /// The human message, e.g. `Invalid value: "string": spec.http[0].route[1].weight in body must be of type integer: "string"`.
    pub message: String,
}

/// Why an `openAPIV3Schema` cannot be used. `path` names the schema node, e.g.
/// `openAPIV3Schema.properties[spec].properties[http].items`.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A schema node is not a JSON object.
    #[error("{path}: must be a JSON object, not {found}")]
    NotAnObject { path: String, found: &'static str },
    /// The root is not `type: object`.
    #[error("openAPIV3Schema.type: must be object at the root, not {found:?}")]
    RootNotObject { found: String },
    /// A node of the structural part has no `type` (and is neither int-or-string nor preserving unknown fields).
    #[error("{path}.type: must not be empty for specified fields")]
    MissingType { path: String },
    /// `type` is not one of the OpenAPI v3 types a CRD may use.
    #[error("{path}.type: unsupported type {found:?} (expected array, boolean, integer, number, object or string)")]
    UnknownType { path: String, found: String },
    /// An array without `items`.
    #[error("{path}.items: must be specified for type array")]
    MissingItems { path: String },
    /// `properties` and `additionalProperties` together.
    #[error("{path}: properties and additionalProperties are mutually exclusive")]
    PropertiesAndAdditionalProperties { path: String },
    /// A keyword whose value has the wrong JSON type.
    #[error("{path}.{keyword}: must be {expected}")]
    Keyword {
        path: String,
        keyword: String,
        expected: &'static str,
    },
    /// A keyword CRD schemas may not use.
    #[error("{path}.{keyword}: not supported in a CRD schema")]
    Unsupported { path: String, keyword: &'static str },
    /// A `pattern` that is not a valid regular expression.
    #[error("{path}.pattern: {pattern:?} is not a valid regular expression")]
    Pattern {
        path: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// A compiled structural schema (from a CRD version's `schema.openAPIV3Schema`).
pub struct Schema {
    root: Node,
    cel_rules: usize,
}

impl Schema {
    /// # Errors
    /// The schema is not structural enough to use (report why).
    pub fn new(open_api_v3_schema: &serde_json::Value) -> Result<Self, SchemaError> {
        let mut cel_rules = 0;
        let root = compile(open_api_v3_schema, "openAPIV3Schema", false, &mut cel_rules)?;
        if root.types != ["object"] {
            return Err(SchemaError::RootNotObject {
                found: root.types.join(","),
            });
        }
        Ok(Self { root, cel_rules })
    }

    /// Applies `default`s (upstream: defaults are applied to missing fields, recursively, also inside items), then prunes every field not in the schema unless under `x-kubernetes-preserve-unknown-fields: true` (and keeps `apiVersion`, `kind`, `metadata` at the root: metadata is never pruned or validated here), then validates. Returns the object as it would be stored, or every error found (not just the first).
    ///
    /// Like the apiserver, this prunes (fields, then non-nullable nulls without a default) before it defaults;
    /// the stored object is the same either way, since defaults hold no unknown fields (see the module docs).
    ///
    /// # Errors
    /// Every field the schema rejects, as the apiserver reports them in a 422 `Status`.
    pub fn admit(&self, object: serde_json::Value) -> Result<serde_json::Value, Vec<FieldError>> {
        let mut object = object;
        prune(&mut object, Some(&self.root), true);
        prune_nulls(&mut object, Some(&self.root), true);
        apply_defaults(&mut object, &self.root, true);

        let mut errors: Vec<FieldError> = validate(&self.root, &object, "", true)
            .errors
            .into_iter()
            .map(Failure::into_field_error)
            .collect();
        if let Value::Object(map) = &object {
            list_errors(&self.root, map, "", true, &mut errors);
        }
        if self.cel_rules > 0 && errors.iter().any(|e| BLOCKING.contains(&e.reason)) {
            errors.push(FieldError {
                reason: "FieldValueInvalid",
                field: NIL_FIELD.to_owned(),
                message: "Invalid value: \"null\": some validation rules were not checked because the object was \
                          invalid; correct the existing errors to complete validation"
                    .to_owned(),
            });
        }
        if errors.is_empty() { Ok(object) } else { Err(errors) }
    }

    /// How many `x-kubernetes-validations` (CEL) rules the schema holds: none of them is evaluated here.
    pub fn unenforced_cel_rules(&self) -> usize {
        self.cel_rules
    }
}

/// The field the apiserver reports for an error without a path (a nil `*field.Path`).
const NIL_FIELD: &str = "<nil>";

/// Error types after which the apiserver skips CEL rules (`hasBlockingErr` in the CR strategy).
const BLOCKING: [&str; 5] = [
    "FieldValueNotSupported",
    "FieldValueRequired",
    "FieldValueTooLong",
    "FieldValueTooMany",
    "FieldValueTypeInvalid",
];

// ---------------------------------------------------------------------------------------------------------
// Compiled schema
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Node {
    /// Empty (value validations), one type, or `["integer", "string"]` for int-or-string.
    types: Vec<&'static str>,
    nullable: bool,
    format: Option<Format>,
    default: Option<Value>,
    enumeration: Option<Vec<Value>>,
    max_length: Option<u64>,
    min_length: Option<u64>,
    pattern: Option<Pattern>,
    maximum: Option<f64>,
    exclusive_maximum: bool,
    minimum: Option<f64>,
    exclusive_minimum: bool,
    multiple_of: Option<f64>,
    max_items: Option<u64>,
    min_items: Option<u64>,
    unique_items: bool,
    max_properties: Option<u64>,
    min_properties: Option<u64>,
    required: Vec<String>,
    properties: BTreeMap<String, Node>,
    additional: Option<Additional>,
    items: Option<Box<Node>>,
    all_of: Vec<Node>,
    any_of: Vec<Node>,
    one_of: Vec<Node>,
    not: Option<Box<Node>>,
    preserve_unknown: bool,
    embedded_resource: bool,
    list_type: ListType,
    list_map_keys: Vec<String>,
}

impl Node {
    /// The schema of field `key` of an object: its property, else `additionalProperties`.
    fn field(&self, key: &str) -> Option<&Node> {
        self.properties.get(key).or(match &self.additional {
            Some(Additional::Schema(node)) => Some(node),
            _ => None,
        })
    }
}

#[derive(Debug)]
enum Additional {
    Allows(bool),
    Schema(Box<Node>),
}

impl Additional {
    fn schema(&self) -> Option<&Node> {
        match self {
            Self::Allows(_) => None,
            Self::Schema(node) => Some(node),
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ListType {
    #[default]
    Atomic,
    Set,
    Map,
}

#[derive(Debug)]
struct Pattern {
    source: String,
    regex: Regex,
}

#[derive(Debug)]
struct Format {
    /// As written in the schema (it appears in messages).
    name: String,
    kind: FormatKind,
}

#[derive(Debug, Clone, Copy)]
enum FormatKind {
    Byte,
    Date,
    DateTime,
    Ipv4,
    Ipv6,
    Cidr,
    Uuid,
    Uuid3,
    Uuid4,
    Uuid5,
    HexColor,
    /// Supported by the apiserver but not checked here.
    Unchecked,
}

/// The formats the apiserver keeps (`StripUnsupportedFormatsPostProcess`); the others are dropped.
fn supported_format(name: &str) -> Option<FormatKind> {
    Some(match name.replace('-', "").as_str() {
        "byte" => FormatKind::Byte,
        "date" => FormatKind::Date,
        "datetime" => FormatKind::DateTime,
        "ipv4" => FormatKind::Ipv4,
        "ipv6" => FormatKind::Ipv6,
        "cidr" => FormatKind::Cidr,
        "uuid" => FormatKind::Uuid,
        "uuid3" => FormatKind::Uuid3,
        "uuid4" => FormatKind::Uuid4,
        "uuid5" => FormatKind::Uuid5,
        "hexcolor" => FormatKind::HexColor,
        "bsonobjectid" | "uri" | "email" | "hostname" | "mac" | "isbn" | "isbn10" | "isbn13" | "creditcard" | "ssn"
        | "rgbcolor" | "password" | "duration" => FormatKind::Unchecked,
        _ => return None,
    })
}

const TYPES: [&str; 6] = ["array", "boolean", "integer", "number", "object", "string"];

/// Keywords a CRD schema may not use.
const UNSUPPORTED: [&str; 7] = [
    "$ref",
    "patternProperties",
    "dependencies",
    "definitions",
    "additionalItems",
    "id",
    "$schema",
];

fn compile(value: &Value, path: &str, value_validation: bool, cel_rules: &mut usize) -> Result<Node, SchemaError> {
    let Value::Object(m) = value else {
        return Err(SchemaError::NotAnObject {
            path: path.to_owned(),
            found: json_kind(value),
        });
    };
    if let Some(keyword) = UNSUPPORTED.into_iter().find(|k| m.contains_key(*k)) {
        return Err(SchemaError::Unsupported {
            path: path.to_owned(),
            keyword,
        });
    }
    let k = Keywords { m, path };
    let mut node = Node {
        nullable: k.flag("nullable")?,
        preserve_unknown: k.flag("x-kubernetes-preserve-unknown-fields")?,
        embedded_resource: k.flag("x-kubernetes-embedded-resource")?,
        max_length: k.count("maxLength")?,
        min_length: k.count("minLength")?,
        maximum: k.number("maximum")?,
        exclusive_maximum: k.flag("exclusiveMaximum")?,
        minimum: k.number("minimum")?,
        exclusive_minimum: k.flag("exclusiveMinimum")?,
        multiple_of: k.number("multipleOf")?,
        max_items: k.count("maxItems")?,
        min_items: k.count("minItems")?,
        unique_items: k.flag("uniqueItems")?,
        max_properties: k.count("maxProperties")?,
        min_properties: k.count("minProperties")?,
        required: k.strings("required")?,
        list_map_keys: k.strings("x-kubernetes-list-map-keys")?,
        default: m.get("default").cloned(),
        ..Node::default()
    };

    if let Some(found) = k.string("type")? {
        let Some(t) = TYPES.into_iter().find(|t| *t == found) else {
            return Err(SchemaError::UnknownType {
                path: path.to_owned(),
                found: found.to_owned(),
            });
        };
        node.types = vec![t];
    }
    if k.flag("x-kubernetes-int-or-string")? {
        node.types = vec!["integer", "string"];
    }
    if let Some(name) = k.string("format")? {
        node.format = supported_format(name).map(|kind| Format {
            name: name.to_owned(),
            kind,
        });
    }
    if let Some(source) = k.string("pattern")? {
        let regex = Regex::new(source).map_err(|source_error| SchemaError::Pattern {
            path: path.to_owned(),
            pattern: source.to_owned(),
            source: source_error,
        })?;
        node.pattern = Some(Pattern {
            source: source.to_owned(),
            regex,
        });
    }
    match m.get("enum") {
        None => {}
        Some(Value::Array(values)) => node.enumeration = Some(values.clone()),
        Some(_) => return Err(k.error("enum", "an array")),
    }
    node.list_type = match k.string("x-kubernetes-list-type")? {
        None | Some("atomic") => ListType::Atomic,
        Some("set") => ListType::Set,
        Some("map") if !node.list_map_keys.is_empty() => ListType::Map,
        Some("map") => return Err(k.error("x-kubernetes-list-map-keys", "non-empty for x-kubernetes-list-type map")),
        Some(_) => return Err(k.error("x-kubernetes-list-type", "atomic, set or map")),
    };
    match m.get("x-kubernetes-validations") {
        None => {}
        Some(Value::Array(rules)) => *cel_rules += rules.len(),
        Some(_) => return Err(k.error("x-kubernetes-validations", "an array")),
    }

    match m.get("properties") {
        None => {}
        Some(Value::Object(properties)) => {
            for (name, sub) in properties {
                let sub_path = format!("{path}.properties[{name}]");
                node.properties
                    .insert(name.clone(), compile(sub, &sub_path, value_validation, cel_rules)?);
            }
        }
        Some(_) => return Err(k.error("properties", "an object")),
    }
    node.additional = match m.get("additionalProperties") {
        None => None,
        Some(Value::Bool(allows)) => Some(Additional::Allows(*allows)),
        Some(sub) => {
            let sub_path = format!("{path}.additionalProperties");
            Some(Additional::Schema(Box::new(compile(
                sub,
                &sub_path,
                value_validation,
                cel_rules,
            )?)))
        }
    };
    node.items = match m.get("items") {
        None => None,
        Some(Value::Array(_)) => return Err(k.error("items", "a schema object and not an array")),
        Some(sub) => Some(Box::new(compile(
            sub,
            &format!("{path}.items"),
            value_validation,
            cel_rules,
        )?)),
    };
    node.all_of = k.schemas("allOf", cel_rules)?;
    node.any_of = k.schemas("anyOf", cel_rules)?;
    node.one_of = k.schemas("oneOf", cel_rules)?;
    node.not = match m.get("not") {
        None => None,
        Some(sub) => Some(Box::new(compile(sub, &format!("{path}.not"), true, cel_rules)?)),
    };

    if !value_validation {
        if node.types.is_empty() && !node.preserve_unknown {
            return Err(SchemaError::MissingType { path: path.to_owned() });
        }
        if node.types == ["array"] && node.items.is_none() {
            return Err(SchemaError::MissingItems { path: path.to_owned() });
        }
        if !node.properties.is_empty() && node.additional.is_some() {
            return Err(SchemaError::PropertiesAndAdditionalProperties { path: path.to_owned() });
        }
    }
    // As the apiserver does when it serves a CRD (`structuraldefaulting.PruneDefaults`).
    if let Some(mut default) = node.default.take() {
        prune(&mut default, Some(&node), false);
        node.default = Some(default);
    }
    Ok(node)
}

/// Typed access to the keywords of one schema node.
struct Keywords<'a> {
    m: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Keywords<'a> {
    fn error(&self, keyword: &str, expected: &'static str) -> SchemaError {
        SchemaError::Keyword {
            path: self.path.to_owned(),
            keyword: keyword.to_owned(),
            expected,
        }
    }

    fn flag(&self, keyword: &str) -> Result<bool, SchemaError> {
        match self.m.get(keyword) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.error(keyword, "a boolean")),
        }
    }

    fn count(&self, keyword: &str) -> Result<Option<u64>, SchemaError> {
        match self.m.get(keyword) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(keyword, "a non-negative integer")),
        }
    }

    fn number(&self, keyword: &str) -> Result<Option<f64>, SchemaError> {
        match self.m.get(keyword) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.error(keyword, "a number")),
        }
    }

    fn string(&self, keyword: &str) -> Result<Option<&'a str>, SchemaError> {
        match self.m.get(keyword) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(keyword, "a string")),
        }
    }

    fn strings(&self, keyword: &str) -> Result<Vec<String>, SchemaError> {
        match self.m.get(keyword) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| self.error(keyword, "an array of strings"))
                })
                .collect(),
            Some(_) => Err(self.error(keyword, "an array of strings")),
        }
    }

    fn schemas(&self, keyword: &str, cel_rules: &mut usize) -> Result<Vec<Node>, SchemaError> {
        match self.m.get(keyword) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(values)) => values
                .iter()
                .enumerate()
                .map(|(i, v)| compile(v, &format!("{}.{keyword}[{i}]", self.path), true, cel_rules))
                .collect(),
            Some(_) => Err(self.error(keyword, "an array of schemas")),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pruning and defaulting
// ---------------------------------------------------------------------------------------------------------

/// Whether field `key` of an embedded resource (or of the root) is kept whatever the schema says.
fn is_kept_meta(key: &str, value: &Value) -> bool {
    match key {
        "apiVersion" | "kind" => value.is_string(),
        "metadata" => value.is_object(),
        _ => false,
    }
}

/// `pruning.prune`: drops the fields `schema` does not declare. `root` is the resource root, whose
/// `metadata` is never touched.
fn prune(value: &mut Value, schema: Option<&Node>, root: bool) {
    if let Some(s) = schema
        && s.preserve_unknown
    {
        skip_prune(value, s, root);
        return;
    }
    match value {
        Value::Object(map) => {
            let Some(s) = schema else {
                map.clear();
                return;
            };
            let embedded = root || s.embedded_resource;
            map.retain(|key, v| {
                if (root && key == "metadata") || (embedded && is_kept_meta(key, v)) {
                    true
                } else if let Some(property) = s.properties.get(key) {
                    prune(v, Some(property), false);
                    true
                } else if let Some(additional) = &s.additional {
                    prune(v, additional.schema(), false);
                    true
                } else {
                    false
                }
            });
        }
        Value::Array(items) => {
            let item_schema = schema.and_then(|s| s.items.as_deref());
            for item in items {
                prune(item, item_schema, false);
            }
        }
        _ => {}
    }
}

/// `pruning.skipPrune`: below `x-kubernetes-preserve-unknown-fields`, unknown fields stay but known ones are
/// pruned by their own schema.
fn skip_prune(value: &mut Value, s: &Node, root: bool) {
    match value {
        Value::Object(map) => {
            let embedded = root || s.embedded_resource;
            for (key, v) in map.iter_mut() {
                if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(property) = s.properties.get(key) {
                    prune(v, Some(property), false);
                } else if let Some(additional) = &s.additional {
                    prune(v, additional.schema(), false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.items.as_deref() {
                for item in items {
                    skip_prune(item, item_schema, false);
                }
            }
        }
        _ => {}
    }
}

/// `defaulting.PruneNonNullableNullsWithoutDefaults`.
fn prune_nulls(value: &mut Value, schema: Option<&Node>, root: bool) {
    match value {
        Value::Object(map) => map.retain(|key, v| {
            if root && key == "metadata" {
                return true;
            }
            let field = schema.and_then(|s| s.field(key));
            if v.is_null() && field.is_some_and(|f| !f.nullable && f.default.is_none()) {
                return false;
            }
            prune_nulls(v, field, false);
            true
        }),
        Value::Array(items) => {
            let item_schema = schema.and_then(|s| s.items.as_deref());
            for item in items {
                prune_nulls(item, item_schema, false);
            }
        }
        _ => {}
    }
}

/// `defaulting.Default`. Like upstream, a default that replaces a `null` array item or map value is not
/// itself defaulted further in the same pass; a default for a missing property is.
fn apply_defaults(value: &mut Value, s: &Node, root: bool) {
    match value {
        Value::Object(map) => {
            for (key, property) in &s.properties {
                let Some(default) = &property.default else { continue };
                if root && key == "metadata" {
                    continue;
                }
                match map.get_mut(key) {
                    None => {
                        map.insert(key.clone(), default.clone());
                    }
                    Some(v) if v.is_null() && !property.nullable => *v = default.clone(),
                    Some(_) => {}
                }
            }
            for (key, v) in map.iter_mut() {
                if root && key == "metadata" {
                    continue;
                }
                if let Some(property) = s.properties.get(key) {
                    apply_defaults(v, property, false);
                } else if let Some(Additional::Schema(additional)) = &s.additional {
                    if v.is_null() && !additional.nullable {
                        *v = additional.default.clone().unwrap_or(Value::Null);
                    } else {
                        apply_defaults(v, additional, false);
                    }
                }
            }
        }
        Value::Array(items) => {
            let Some(item_schema) = s.items.as_deref() else { return };
            for item in items {
                if item.is_null() && !item_schema.nullable {
                    *item = item_schema.default.clone().unwrap_or(Value::Null);
                } else {
                    apply_defaults(item, item_schema, false);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------------------
// Validation (kube-openapi's SchemaValidator)
// ---------------------------------------------------------------------------------------------------------

/// A kube-openapi `Result`: errors and the `MatchCount` it uses to pick the best failing alternative.
#[derive(Default)]
struct Outcome {
    errors: Vec<Failure>,
    matched: usize,
}

impl Outcome {
    fn valid(&self) -> bool {
        self.errors.is_empty()
    }

    fn merge(&mut self, other: Self) {
        self.errors.extend(other.errors);
        self.matched += other.matched;
    }

    fn failed(failure: Failure) -> Self {
        Self {
            errors: vec![failure],
            matched: 0,
        }
    }
}

/// A kube-openapi error: `name` is its path, `message` its `Error()` text.
struct Failure {
    name: String,
    kind: FailureKind,
    message: String,
}

enum FailureKind {
    Required,
    NotSupported {
        value: Value,
        allowed: Vec<Value>,
    },
    TooLong {
        max: u64,
    },
    TooMany {
        actual: u64,
        max: u64,
    },
    TypeInvalid {
        value: Value,
    },
    Invalid {
        value: Value,
    },
    /// Not an `*errors.Validation` (oneOf/anyOf/allOf/not): reported without a field.
    Composite,
}

impl Failure {
    fn new(name: &str, kind: FailureKind, message: String) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            message,
        }
    }

    fn type_invalid(name: &str, type_name: &str, value: &str) -> Self {
        let message = format!("{name} in body must be of type {type_name}: {}", go_quote(value));
        Self::new(
            name,
            FailureKind::TypeInvalid {
                value: Value::String(value.to_owned()),
            },
            message,
        )
    }

    fn invalid(name: &str, value: Value, message: String) -> Self {
        Self::new(name, FailureKind::Invalid { value }, message)
    }

    fn composite(message: String) -> Self {
        Self::new("", FailureKind::Composite, message)
    }

    /// `kubeOpenAPIResultToFieldErrors`, then `field.Error.ErrorBody`.
    fn into_field_error(self) -> FieldError {
        let field = match self.name.as_str() {
            "" | "." => NIL_FIELD.to_owned(),
            name => name.strip_prefix('.').unwrap_or(name).to_owned(),
        };
        let (reason, message) = match self.kind {
            FailureKind::Required => ("FieldValueRequired", "Required value".to_owned()),
            FailureKind::NotSupported { value, allowed } => {
                let mut message = format!("Unsupported value: {}", error_body_value(&value));
                if !allowed.is_empty() {
                    let quoted: Vec<String> = allowed
                        .iter()
                        .map(|a| match a {
                            Value::String(s) => go_quote(s),
                            other => go_quote(&serde_json::to_string(other).unwrap_or_default()),
                        })
                        .collect();
                    let _ = write!(message, ": supported values: {}", quoted.join(", "));
                }
                ("FieldValueNotSupported", message)
            }
            FailureKind::TooLong { max } => (
                "FieldValueTooLong",
                format!("Too long: may not be more than {max} bytes"),
            ),
            FailureKind::TooMany { actual, max } => (
                "FieldValueTooMany",
                format!("Too many: {actual}: must have at most {max} items"),
            ),
            FailureKind::TypeInvalid { value } => (
                "FieldValueTypeInvalid",
                format!("Invalid value: {}: {}", error_body_value(&value), self.message),
            ),
            FailureKind::Invalid { value } => (
                "FieldValueInvalid",
                format!("Invalid value: {}: {}", error_body_value(&value), self.message),
            ),
            FailureKind::Composite => {
                return FieldError {
                    reason: "FieldValueInvalid",
                    field: NIL_FIELD.to_owned(),
                    message: format!("Invalid value: \"\": {}", self.message),
                };
            }
        };
        FieldError { reason, field, message }
    }
}

/// `SchemaValidator.Validate`. `root` skips the resource's `metadata`.
fn validate(s: &Node, data: &Value, path: &str, root: bool) -> Outcome {
    let mut out = Outcome::default();
    if data.is_null() {
        match check_type(s, data, path) {
            Some(failure) => out.errors.push(failure),
            None => out.matched += 1,
        }
        if let Some(failure) = check_enum(s, data, path) {
            out.errors.push(failure);
        }
        return out;
    }

    // Each applicable validator's result is merged, then counted once more.
    if !s.types.is_empty() || s.format.is_some() {
        match check_type(s, data, path) {
            Some(failure) => out.errors.push(failure),
            None => out.matched += 1,
        }
        out.matched += 1;
    }
    out.merge(check_value_validations(s, data, path, root));
    out.matched += 1;
    if let Value::String(text) = data {
        out.errors.extend(check_string(s, text, path));
        out.matched += 1;
        if let Some(format) = &s.format {
            if !format_matches(format.kind, text) {
                out.errors.push(Failure::type_invalid(path, &format.name, text));
            }
            out.matched += 1;
        }
    }
    if let Value::Number(number) = data {
        out.merge(check_number(s, number, path));
        out.matched += 1;
    }
    if let Value::Array(items) = data {
        out.merge(check_array(s, items, path));
        out.matched += 1;
    }
    out.errors.extend(check_enum(s, data, path));
    out.matched += 1;
    if let Value::Object(map) = data {
        out.merge(check_object(s, map, path, root));
        out.matched += 1;
    }
    out.matched += 1;
    out
}

/// The JSON type of a value as kube-openapi infers it, and the format of Go's decoded type.
fn json_type(data: &Value) -> (&'static str, &'static str) {
    match data {
        Value::Null => ("null", ""),
        Value::Bool(_) => ("boolean", ""),
        Value::Number(n) if n.is_i64() => ("integer", "int64"),
        Value::Number(_) => ("number", "float64"),
        Value::String(_) => ("string", ""),
        Value::Array(_) => ("array", ""),
        Value::Object(_) => ("object", ""),
    }
}

/// `swag.IsFloat64AJSONInteger`.
fn is_json_integer(f: f64) -> bool {
    f.is_finite() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0
}

/// `typeValidator.Validate`.
fn check_type(s: &Node, data: &Value, path: &str) -> Option<Failure> {
    let format = s.format.as_ref().map_or("", |f| f.name.as_str());
    if data.is_null() {
        if !s.types.is_empty() && !s.nullable {
            return Some(Failure::type_invalid(path, &s.types.join(","), "null"));
        }
        return None;
    }
    let has = |t: &str| s.types.contains(&t);
    let (found, found_format) = json_type(data);
    let float_int = found == "number" && data.as_f64().is_some_and(is_json_integer) && has("integer");
    let int_float = found == "integer" && has("number");
    let stringish = data.is_string() || data.is_array();
    if !format.is_empty() {
        if stringish {
            if !(has("number") || has("integer")) {
                return None;
            }
        } else if !(has(found) || found_format == format || float_int || int_float) {
            return Some(Failure::type_invalid(path, format, found_format));
        }
    }
    if !(has(found) || float_int || int_float) {
        return Some(Failure::type_invalid(path, &s.types.join(","), found));
    }
    None
}

/// `schemaPropsValidator.Validate`: anyOf, oneOf, allOf, not.
fn check_value_validations(s: &Node, data: &Value, path: &str, root: bool) -> Outcome {
    let mut out = Outcome::default();
    if !s.any_of.is_empty() {
        let mut best: Option<Outcome> = None;
        let mut success: Option<Outcome> = None;
        for sub in &s.any_of {
            let result = validate(sub, data, path, root);
            if result.valid() {
                best = None;
                success = Some(result);
                break;
            }
            if best.as_ref().is_none_or(|b| result.matched > b.matched) {
                best = Some(result);
            }
        }
        if success.is_none() {
            out.errors.push(Failure::composite(format!(
                "{} must validate at least one schema (anyOf)",
                go_quote(path)
            )));
        }
        if let Some(result) = best.or(success) {
            out.merge(result);
        }
    }
    if !s.one_of.is_empty() {
        let mut best: Option<Outcome> = None;
        let mut success: Option<Outcome> = None;
        let mut validated = 0;
        for sub in &s.one_of {
            let result = validate(sub, data, path, root);
            if result.valid() {
                validated += 1;
                best = None;
                success.get_or_insert(result);
                continue;
            }
            if validated == 0 && best.as_ref().is_none_or(|b| result.matched > b.matched) {
                best = Some(result);
            }
        }
        if validated == 1 {
            if let Some(result) = success {
                out.merge(result);
            }
        } else {
            let found = if validated == 0 {
                "Found none valid".to_owned()
            } else {
                format!("Found {validated} valid alternatives")
            };
            out.errors.push(Failure::composite(format!(
                "{} must validate one and only one schema (oneOf). {found}",
                go_quote(path)
            )));
            if let Some(result) = best {
                out.merge(result);
            }
        }
    }
    if !s.all_of.is_empty() {
        let mut validated = 0;
        for sub in &s.all_of {
            let result = validate(sub, data, path, root);
            if result.valid() {
                validated += 1;
            }
            out.merge(result);
        }
        if validated != s.all_of.len() {
            let none = if validated == 0 { ". None validated" } else { "" };
            out.errors.push(Failure::composite(format!(
                "{} must validate all the schemas (allOf){none}",
                go_quote(path)
            )));
        }
    }
    if let Some(not) = &s.not
        && validate(not, data, path, root).valid()
    {
        out.errors.push(Failure::composite(format!(
            "{} must not validate the schema (not)",
            go_quote(path)
        )));
    }
    out.matched += 1;
    out
}

/// `stringValidator.Validate`: only the first failure counts.
fn check_string(s: &Node, text: &str, path: &str) -> Option<Failure> {
    let length = text.chars().count() as u64;
    if let Some(max) = s.max_length
        && length > max
    {
        let message = format!("{path} in body should be at most {max} chars long");
        return Some(Failure::new(path, FailureKind::TooLong { max }, message));
    }
    if let Some(min) = s.min_length
        && length < min
    {
        let message = format!("{path} in body should be at least {min} chars long");
        return Some(Failure::invalid(path, Value::String(text.to_owned()), message));
    }
    if let Some(pattern) = &s.pattern
        && !pattern.regex.is_match(text)
    {
        let message = format!("{path} in body should match '{}'", pattern.source);
        return Some(Failure::invalid(path, Value::String(text.to_owned()), message));
    }
    None
}

/// `numberValidator.Validate`: multipleOf, minimum, maximum; integers are compared as integers.
fn check_number(s: &Node, number: &serde_json::Number, path: &str) -> Outcome {
    let mut out = Outcome {
        errors: Vec::new(),
        matched: 1,
    };
    let value = Value::Number(number.clone());
    let integer = number.as_i64();
    let float = number.as_f64().unwrap_or(f64::NAN);
    if let Some(factor) = s.multiple_of {
        if factor < 0.0 {
            let shown = integer.map_or_else(|| go_float(factor), |_| (factor as i64).to_string());
            let message = format!("factor MultipleOf declared for {path} must be positive: {shown}");
            out.errors.push(Failure::invalid(path, number_value(factor), message));
        } else if let Some(i) = integer {
            let f = factor as i64;
            if f != 0 && (i / f) * f != i {
                let message = format!("{path} in body should be a multiple of {f}");
                out.errors.push(Failure::invalid(path, value.clone(), message));
            }
        } else {
            let multiple = if factor < 1.0 {
                1.0 / factor * float
            } else {
                float / factor
            };
            if !is_json_integer(multiple) {
                let message = format!("{path} in body should be a multiple of {}", go_float(factor));
                out.errors.push(Failure::invalid(path, value.clone(), message));
            }
        }
    }
    let bound = |limit: f64, exclusive: bool, below: bool| -> Option<Failure> {
        let (fails, shown) = match integer {
            Some(i) => {
                let l = limit as i64;
                let fails = if below {
                    i < l || (exclusive && i == l)
                } else {
                    i > l || (exclusive && i == l)
                };
                (fails, l.to_string())
            }
            None => {
                let fails = if below {
                    float < limit || (exclusive && float == limit)
                } else {
                    float > limit || (exclusive && float == limit)
                };
                (fails, go_float(limit))
            }
        };
        let relation = match (below, exclusive) {
            (true, false) => "greater than or equal to",
            (true, true) => "greater than",
            (false, false) => "less than or equal to",
            (false, true) => "less than",
        };
        fails.then(|| {
            Failure::invalid(
                path,
                value.clone(),
                format!("{path} in body should be {relation} {shown}"),
            )
        })
    };
    if let Some(minimum) = s.minimum {
        out.errors.extend(bound(minimum, s.exclusive_minimum, true));
    }
    if let Some(maximum) = s.maximum {
        out.errors.extend(bound(maximum, s.exclusive_maximum, false));
    }
    out
}

fn number_value(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// `schemaSliceValidator.Validate`: items, then minItems, maxItems, uniqueItems.
fn check_array(s: &Node, items: &[Value], path: &str) -> Outcome {
    let mut out = Outcome::default();
    if let Some(item_schema) = &s.items {
        for (i, item) in items.iter().enumerate() {
            out.merge(validate(item_schema, item, &format!("{path}[{i}]"), false));
        }
    }
    let size = items.len() as u64;
    if let Some(min) = s.min_items
        && size < min
    {
        let message = format!("{path} in body should have at least {min} items");
        out.errors.push(Failure::invalid(path, Value::from(size), message));
    }
    if let Some(max) = s.max_items
        && size > max
    {
        let message = format!("{path} in body should have at most {max} items");
        out.errors
            .push(Failure::new(path, FailureKind::TooMany { actual: size, max }, message));
    }
    if s.unique_items && items.iter().enumerate().any(|(i, a)| items[..i].contains(a)) {
        let message = format!("{path} in body shouldn't contain duplicates");
        out.errors
            .push(Failure::invalid(path, Value::String(String::new()), message));
    }
    out.matched += 1;
    out
}

/// `basicCommonValidator.Validate`: enum.
fn check_enum(s: &Node, data: &Value, path: &str) -> Option<Failure> {
    let allowed = s.enumeration.as_ref().filter(|values| !values.is_empty())?;
    if !data.is_null() && allowed.iter().any(|a| json_equal(data, a)) {
        return None;
    }
    let shown: Vec<String> = allowed.iter().map(go_v).collect();
    let message = format!("{path} in body should be one of [{}]", shown.join(" "));
    Some(Failure::new(
        path,
        FailureKind::NotSupported {
            value: data.clone(),
            allowed: allowed.clone(),
        },
        message,
    ))
}

/// JSON equality with numbers compared by value.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// `objectValidator.Validate`.
fn check_object(s: &Node, map: &Map<String, Value>, path: &str, root: bool) -> Outcome {
    let mut out = Outcome::default();
    let skipped = |key: &str| root && key == "metadata";
    let size = map.len() as u64;
    if let Some(min) = s.min_properties
        && size < min
    {
        let message = format!("{path} in body should have at least {min} properties");
        return Outcome::failed(Failure::invalid(path, Value::from(size), message));
    }
    if let Some(max) = s.max_properties
        && size > max
    {
        let message = format!("{path} in body should have at most {max} properties");
        return Outcome::failed(Failure::new(path, FailureKind::TooMany { actual: size, max }, message));
    }
    match &s.additional {
        Some(Additional::Allows(false)) => {
            for key in map.keys().filter(|k| !skipped(k) && !s.properties.contains_key(*k)) {
                let message = format!("{path}.{key} in body is a forbidden property");
                out.errors
                    .push(Failure::invalid(path, Value::String(key.clone()), message));
            }
        }
        Some(Additional::Schema(additional)) => {
            for (key, value) in map
                .iter()
                .filter(|(k, _)| !skipped(k) && !s.properties.contains_key(*k))
            {
                out.merge(validate(additional, value, &format!("{path}.{key}"), false));
            }
        }
        Some(Additional::Allows(true)) | None => {}
    }
    for (name, property) in s.properties.iter().filter(|(k, _)| !skipped(k)) {
        if let Some(value) = map.get(name) {
            let child = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.merge(validate(property, value, &child, false));
        }
    }
    for name in s.required.iter().filter(|k| !skipped(k) && !map.contains_key(*k)) {
        let name = format!("{path}.{name}");
        let message = format!("{name} in body is required");
        out.errors.push(Failure::new(&name, FailureKind::Required, message));
    }
    out
}

/// A string format check, as kube-openapi's `strfmt.Default` registry does it.
fn format_matches(kind: FormatKind, text: &str) -> bool {
    match kind {
        FormatKind::Byte => is_base64(text),
        FormatKind::Date => is_date(text),
        FormatKind::DateTime => is_date_time(text),
        FormatKind::Ipv4 => text.parse::<IpAddr>().is_ok() && text.contains('.'),
        FormatKind::Ipv6 => text.parse::<IpAddr>().is_ok() && text.contains(':'),
        FormatKind::Cidr => is_cidr(text),
        FormatKind::Uuid => matches_static(&UUID, text),
        FormatKind::Uuid3 => matches_static(&UUID3, text),
        FormatKind::Uuid4 => matches_static(&UUID4, text),
        FormatKind::Uuid5 => matches_static(&UUID5, text),
        FormatKind::HexColor => matches_static(&HEX_COLOR, text),
        FormatKind::Unchecked => true,
    }
}

static UUID: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new("(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$").ok());
static UUID3: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new("(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?3[0-9a-f]{3}-?[0-9a-f]{4}-?[0-9a-f]{12}$").ok());
static UUID4: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new("(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$").ok());
static UUID5: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new("(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?5[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$").ok());
static HEX_COLOR: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new("^#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$").ok());

fn matches_static(regex: &LazyLock<Option<Regex>>, text: &str) -> bool {
    regex.as_ref().is_none_or(|r| r.is_match(text))
}

/// govalidator's `IsBase64`: standard alphabet, padded, not empty.
fn is_base64(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return false;
    }
    let padding = bytes.iter().rev().take_while(|b| **b == b'=').count();
    padding <= 2
        && bytes[..bytes.len() - padding]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Go's `time.Parse("2006-01-02", text)`.
fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &text[range];
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10)) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// kube-openapi's `strfmt.IsDateTime`: a date, `t`, then `hh:mm:ss`, an optional fraction and `z` or an offset.
fn is_date_time(text: &str) -> bool {
    if text.len() < 4 {
        return false;
    }
    let lower = text.to_lowercase();
    let mut parts = lower.split('t');
    let (Some(date), Some(time)) = (parts.next(), parts.next()) else {
        return false;
    };
    if !is_date(date) {
        return false;
    }
    let b = time.as_bytes();
    if b.len() < 9 || b[2] != b':' || b[5] != b':' {
        return false;
    }
    let two_digits = |at: usize| b[at].is_ascii_digit() && b[at + 1].is_ascii_digit();
    if !(two_digits(0) && two_digits(3) && two_digits(6)) {
        return false;
    }
    if &time[0..2] > "23" || &time[3..5] > "59" || &time[6..8] > "59" {
        return false;
    }
    let zone = |rest: &str| {
        let z = rest.as_bytes();
        rest == "z"
            || (z.len() == 6
                && (z[0] == b'+' || z[0] == b'-')
                && z[1].is_ascii_digit()
                && z[2].is_ascii_digit()
                && z[3] == b':'
                && z[4].is_ascii_digit()
                && z[5].is_ascii_digit())
    };
    let rest = &time[8..];
    if zone(rest) {
        return true;
    }
    // `(.[0-9]+)?`: any one character, then digits.
    let Some(first) = rest.chars().next() else { return false };
    let after = &rest[first.len_utf8()..];
    let run = after.bytes().take_while(u8::is_ascii_digit).count();
    (1..=run).any(|n| zone(&after[n..]))
}

/// Go's `net.ParseCIDR`.
fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(ip) = address.parse::<IpAddr>() else {
        return false;
    };
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    !prefix.is_empty()
        && prefix.len() <= 3
        && prefix.bytes().all(|c| c.is_ascii_digit())
        && (prefix == "0" || !prefix.starts_with('0'))
        && prefix.parse::<u32>().is_ok_and(|p| p <= bits)
}

// ---------------------------------------------------------------------------------------------------------
// x-kubernetes-list-type set/map uniqueness (schema/listtype)
// ---------------------------------------------------------------------------------------------------------

/// `listtype.ValidateListSetsAndMaps`, with `field.Path` rendering (`a.b`, `a[0]`, `a[key]`).
fn list_errors(s: &Node, map: &Map<String, Value>, path: &str, root: bool, out: &mut Vec<FieldError>) {
    if let Some(Additional::Schema(additional)) = &s.additional {
        for (key, value) in map.iter().filter(|(k, _)| !(root && *k == "metadata")) {
            list_value(additional, value, &format!("{path}[{key}]"), out);
        }
    }
    for (key, value) in map.iter().filter(|(k, _)| !(root && *k == "metadata")) {
        if let Some(property) = s.properties.get(key) {
            let child = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            list_value(property, value, &child, out);
        }
    }
}

fn list_value(s: &Node, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    match value {
        Value::Array(items) => {
            match s.list_type {
                ListType::Set => {
                    for i in first_repeats(items.iter().map(canonical_json)) {
                        out.push(duplicate(path, i, error_body_value(&items[i])));
                    }
                }
                ListType::Map => list_map(s, items, path, out),
                ListType::Atomic => {}
            }
            if let Some(item_schema) = &s.items {
                for (i, item) in items.iter().enumerate() {
                    list_value(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::Object(map) => list_errors(s, map, path, false, out),
        _ => {}
    }
}

fn list_map(s: &Node, items: &[Value], path: &str, out: &mut Vec<FieldError>) {
    if let Some((i, item)) = items.iter().enumerate().find(|(_, x)| !x.is_object() && !x.is_null()) {
        out.push(FieldError {
            reason: "FieldValueInvalid",
            field: format!("{path}[{i}]"),
            message: format!(
                "Invalid value: {}: must be an object for an array of list-type map",
                error_body_value(item)
            ),
        });
        return;
    }
    if items.len() <= 1 {
        return;
    }
    let keys: Vec<Map<String, Value>> = items
        .iter()
        .map(|item| {
            s.list_map_keys
                .iter()
                .filter_map(|k| item.get(k).map(|v| (k.clone(), v.clone())))
                .collect()
        })
        .collect();
    let identities = keys.iter().map(|key| {
        // A single missing key differs from every value, even `null`.
        if s.list_map_keys.len() == 1 && key.is_empty() {
            "\u{0}unspecified".to_owned()
        } else {
            canonical_json(&Value::Object(key.clone()))
        }
    });
    for i in first_repeats(identities) {
        out.push(duplicate(path, i, go_sharp(&Value::Object(keys[i].clone()))));
    }
}

fn duplicate(path: &str, index: usize, shown: String) -> FieldError {
    FieldError {
        reason: "FieldValueDuplicate",
        field: format!("{path}[{index}]"),
        message: format!("Duplicate value: {shown}"),
    }
}

/// The indices where a value is seen for the second time (`validateListSet`).
fn first_repeats(identities: impl Iterator<Item = String>) -> Vec<usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut repeats = Vec::new();
    for (i, identity) in identities.enumerate() {
        let times = seen.entry(identity).or_insert(0);
        *times += 1;
        if *times == 2 {
            repeats.push(i);
        }
    }
    repeats
}

/// JSON with object keys sorted, so equal values have equal text.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap_or_default(), canonical_json(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        scalar => serde_json::to_string(scalar).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Go formatting, for messages identical to the apiserver's
// ---------------------------------------------------------------------------------------------------------

/// How `field.Error.ErrorBody` shows a bad value decoded from JSON.
fn error_body_value(value: &Value) -> String {
    match value {
        Value::Null => "\"null\"".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_number(n),
        Value::String(s) => go_quote(s),
        Value::Array(_) | Value::Object(_) => go_sharp(value),
    }
}

/// A JSON number as Go prints the `int64` or `float64` it decodes to.
fn go_number(n: &serde_json::Number) -> String {
    match n.as_i64() {
        Some(i) => i.to_string(),
        None => go_float(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// Go's `%v` of a `float64` (`strconv.FormatFloat(f, 'g', -1, 64)`).
fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    let scientific = format!("{:e}", f.abs());
    let Some((mantissa, exponent)) = scientific.split_once('e') else {
        return f.to_string();
    };
    let Ok(exponent) = exponent.parse::<i32>() else {
        return f.to_string();
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f < 0.0 { "-" } else { "" };
    if !(-4..6).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let point = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{first}{point}e{exponent_sign}{:02}", exponent.abs());
    }
    let point = exponent + 1;
    let length = digits.len() as i32;
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point >= length {
        format!("{digits}{}", "0".repeat((point - length) as usize))
    } else {
        let (whole, fraction) = digits.split_at(point as usize);
        format!("{whole}.{fraction}")
    };
    format!("{sign}{body}")
}

/// Go's `strconv.Quote` (`%q`).
fn go_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            ' ' => out.push(' '),
            c if !c.is_control() && !c.is_whitespace() => out.push(c),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// Go's `%#v` of a value decoded from JSON into `interface{}`.
fn go_sharp(value: &Value) -> String {
    match value {
        Value::Null => "interface {}(nil)".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_number(n),
        Value::String(s) => go_quote(s),
        Value::Array(items) => {
            format!(
                "[]interface {{}}{{{}}}",
                items.iter().map(go_sharp).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", go_quote(k), go_sharp(v)))
                .collect();
            format!("map[string]interface {{}}{{{}}}", inner.join(", "))
        }
    }
}

/// Go's `%v` of a value decoded from JSON into `interface{}`.
fn go_v(value: &Value) -> String {
    match value {
        Value::Null => "<nil>".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_number(n),
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(go_v).collect::<Vec<_>>().join(" ")),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries.into_iter().map(|(k, v)| format!("{k}:{}", go_v(v))).collect();
            format!("map[{}]", inner.join(" "))
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::process::Command;
    use std::sync::Mutex;

    use serde_json::{Value, json};

    use super::{FieldError, Schema, SchemaError, go_float, go_quote};

    /// The CRDs in `shared/crds/<relative>`, as JSON, converted by `kubectl` (offline).
    fn crds(relative: &str) -> Vec<Value> {
        static CACHE: Mutex<BTreeMap<String, Vec<Value>>> = Mutex::new(BTreeMap::new());
        if let Some(documents) = CACHE.lock().expect("cache").get(relative) {
            return documents.clone();
        }
        let path = format!("{}/../../../shared/crds/{relative}", env!("CARGO_MANIFEST_DIR"));
        let output = Command::new("kubectl")
            .args([
                "annotate",
                "--local",
                "-o",
                "json",
                "-f",
                &path,
                "kubesim.test/loaded=true",
            ])
            .env("KUBECONFIG", "/dev/null")
            .output()
            .expect("kubectl is installed");
        assert!(
            output.status.success(),
            "kubectl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut documents = Vec::new();
        for document in serde_json::Deserializer::from_slice(&output.stdout).into_iter::<Value>() {
            let document = document.expect("kubectl prints JSON");
            match document["items"].as_array() {
                Some(items) if document["kind"] == "List" => documents.extend(items.iter().cloned()),
                _ => documents.push(document),
            }
        }
        CACHE
            .lock()
            .expect("cache")
            .insert(relative.to_owned(), documents.clone());
        documents
    }

    /// The storage version's schema of the one CRD in `relative`.
    fn storage_schema(relative: &str) -> Schema {
        let documents = crds(relative);
        assert_eq!(documents.len(), 1, "{relative} holds one CRD");
        let versions = documents[0]["spec"]["versions"].as_array().expect("versions");
        let storage = versions
            .iter()
            .find(|v| v["storage"] == true)
            .expect("a storage version");
        Schema::new(&storage["schema"]["openAPIV3Schema"]).expect("the schema compiles")
    }

    fn cel_not_checked() -> FieldError {
        FieldError {
            reason: "FieldValueInvalid",
            field: "<nil>".to_owned(),
            message: "Invalid value: \"null\": some validation rules were not checked because the object was invalid; \
                      correct the existing errors to complete validation"
                .to_owned(),
        }
    }

    fn error(reason: &'static str, field: &str, message: &str) -> FieldError {
        FieldError {
            reason,
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }

    fn weighted_virtual_service() -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default", "labels": {"app": "reviews"}},
            "spec": {
                "hosts": ["reviews"],
                "http": [{
                    "name": "primary",
                    "match": [{"uri": {"prefix": "/api"}}],
                    "route": [
                        {"destination": {"host": "reviews", "subset": "stable", "port": {"number": 9080}}, "weight": 90},
                        {"destination": {"host": "reviews", "subset": "canary", "port": {"number": 9080}}, "weight": 10}
                    ],
                    "timeout": "5s"
                }]
            }
        })
    }

    #[test]
    fn every_istio_and_gateway_api_crd_version_compiles_and_its_cel_rules_are_counted() {
        let mut counts = BTreeMap::new();
        for file in [
            "istio/virtualservices.yaml",
            "istio/destinationrules.yaml",
            "istio/gateways.yaml",
            "gateway-api/httproutes.yaml",
            "gateway-api/gateways.yaml",
            "gateway-api/gatewayclasses.yaml",
        ] {
            for crd in crds(file) {
                for version in crd["spec"]["versions"].as_array().expect("versions") {
                    let schema = Schema::new(&version["schema"]["openAPIV3Schema"])
                        .unwrap_or_else(|e| panic!("{file} {}: {e}", version["name"]));
                    let name = format!(
                        "{} {}",
                        crd["spec"]["names"]["kind"].as_str().expect("kind"),
                        version["name"]
                    );
                    counts.insert(
                        format!("{} {name}", crd["spec"]["group"].as_str().expect("group")),
                        schema.unenforced_cel_rules(),
                    );
                }
            }
        }
        let expected: BTreeMap<String, usize> = [
            ("gateway.networking.k8s.io Gateway \"v1\"", 16),
            ("gateway.networking.k8s.io Gateway \"v1beta1\"", 16),
            ("gateway.networking.k8s.io GatewayClass \"v1\"", 1),
            ("gateway.networking.k8s.io GatewayClass \"v1beta1\"", 1),
            ("gateway.networking.k8s.io HTTPRoute \"v1\"", 89),
            ("gateway.networking.k8s.io HTTPRoute \"v1beta1\"", 89),
            ("networking.istio.io DestinationRule \"v1\"", 47),
            ("networking.istio.io DestinationRule \"v1alpha3\"", 47),
            ("networking.istio.io DestinationRule \"v1beta1\"", 47),
            ("networking.istio.io Gateway \"v1\"", 3),
            ("networking.istio.io Gateway \"v1alpha3\"", 3),
            ("networking.istio.io Gateway \"v1beta1\"", 3),
            ("networking.istio.io VirtualService \"v1\"", 6),
            ("networking.istio.io VirtualService \"v1alpha3\"", 6),
            ("networking.istio.io VirtualService \"v1beta1\"", 6),
        ]
        .into_iter()
        .map(|(name, count)| (name.to_owned(), count))
        .collect();
        assert_eq!(counts, expected);
    }

    #[test]
    fn weighted_virtual_service_is_admitted_with_only_unknown_fields_pruned() {
        let schema = storage_schema("istio/virtualservices.yaml");
        let mut object = weighted_virtual_service();
        object["metadata"]["unknownMetadataField"] = json!("kept: metadata is not pruned here");
        object["spec"]["http"][0]["bogus"] = json!(true);
        object["spec"]["http"][0]["route"][1]["destination"]["bogus"] = json!({"deep": 1});
        object["status"] = json!({
            "observedGeneration": 3,
            "vendorExtension": {"kept": "status preserves unknown fields"},
            "conditions": [{"type": "Reconciled", "status": "True", "bogus": "pruned: conditions do not preserve"}]
        });

        let mut expected = weighted_virtual_service();
        expected["metadata"]["unknownMetadataField"] = json!("kept: metadata is not pruned here");
        expected["status"] = json!({
            "observedGeneration": 3,
            "vendorExtension": {"kept": "status preserves unknown fields"},
            "conditions": [{"type": "Reconciled", "status": "True"}]
        });
        assert_eq!(schema.admit(object), Ok(expected));
    }

    #[test]
    fn string_route_weight_is_rejected_as_type_invalid_at_its_field_path() {
        let schema = storage_schema("istio/virtualservices.yaml");
        let mut object = weighted_virtual_service();
        object["spec"]["http"][0]["route"][0]["weight"] = json!("fifty");

        assert_eq!(
            schema.admit(object),
            Err(vec![
                error(
                    "FieldValueTypeInvalid",
                    "spec.http[0].route[0].weight",
                    "Invalid value: \"string\": spec.http[0].route[0].weight in body must be of type integer: \"string\"",
                ),
                cel_not_checked(),
            ])
        );
    }

    #[test]
    fn destination_rule_with_subsets_is_admitted_unchanged() {
        let schema = storage_schema("istio/destinationrules.yaml");
        let object = json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {
                "host": "reviews.default.svc.cluster.local",
                "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                "subsets": [
                    {"name": "stable", "labels": {"version": "v1"}},
                    {
                        "name": "canary",
                        "labels": {"version": "v2"},
                        "trafficPolicy": {"connectionPool": {"http": {"http1MaxPendingRequests": 10, "idleTimeout": "30s"}}}
                    }
                ]
            }
        });
        assert_eq!(schema.admit(object.clone()), Ok(object));
    }

    #[test]
    fn http_route_defaults_are_filled_into_parent_refs_rules_matches_and_backend_refs() {
        let schema = storage_schema("gateway-api/httproutes.yaml");
        let route = |spec: Value| {
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "reviews", "namespace": "default"},
                "spec": spec
            })
        };
        let object = route(json!({
            "parentRefs": [{"name": "mesh-gateway"}],
            "rules": [{
                "matches": [{"path": {"value": "/reviews"}}, {"headers": [{"name": "x-canary", "value": "1"}]}],
                "backendRefs": [{"name": "reviews", "port": 9080}]
            }]
        }));
        let expected = route(json!({
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "mesh-gateway"}],
            "rules": [{
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/reviews"}},
                    // `path` has a default of its own: header-only matches get it too, as on a real cluster.
                    {"headers": [{"name": "x-canary", "type": "Exact", "value": "1"}], "path": {"type": "PathPrefix", "value": "/"}}
                ],
                "backendRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080, "weight": 1}]
            }]
        }));
        assert_eq!(schema.admit(object), Ok(expected));

        let without_rules = route(json!({"parentRefs": [{"name": "mesh-gateway", "kind": "Gateway"}]}));
        let defaulted_rules = route(json!({
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "mesh-gateway"}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]
        }));
        assert_eq!(schema.admit(without_rules), Ok(defaulted_rules));
    }

    #[test]
    fn enum_violation_is_reported_as_not_supported_with_the_allowed_values() {
        let schema = storage_schema("istio/destinationrules.yaml");
        let object = json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "reviews"},
            "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}
        });
        assert_eq!(
            schema.admit(object),
            Err(vec![
                error(
                    "FieldValueNotSupported",
                    "spec.trafficPolicy.loadBalancer.simple",
                    "Unsupported value: \"FASTEST\": supported values: \"UNSPECIFIED\", \"LEAST_CONN\", \"RANDOM\", \
                     \"PASSTHROUGH\", \"ROUND_ROBIN\", \"LEAST_REQUEST\"",
                ),
                cel_not_checked(),
            ])
        );
    }

    #[test]
    fn missing_required_field_is_reported_as_required() {
        let schema = storage_schema("istio/destinationrules.yaml");
        let object = json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "reviews"},
            "spec": {"subsets": [{"labels": {"version": "v1"}}]}
        });
        assert_eq!(
            schema.admit(object),
            Err(vec![
                error("FieldValueRequired", "spec.subsets[0].name", "Required value"),
                error("FieldValueRequired", "spec.host", "Required value"),
                cel_not_checked(),
            ])
        );
    }

    #[test]
    fn every_error_in_an_object_is_reported_together() {
        let schema = storage_schema("istio/virtualservices.yaml");
        let mut object = weighted_virtual_service();
        object["spec"]["hosts"] = json!("reviews");
        object["spec"]["http"][0]["match"][0]["uri"] = json!({"exact": "/api", "prefix": "/api"});
        object["spec"]["http"][0]["route"][0]["weight"] = json!(1.5);
        object["spec"]["http"][0]["route"][1]["destination"]["port"]["number"] = json!(-1);
        object["spec"]["http"][0]["directResponse"] = json!({"body": {"string": "gone"}});
        assert_eq!(
            schema.admit(object),
            Err(vec![
                error(
                    "FieldValueTypeInvalid",
                    "spec.hosts",
                    "Invalid value: \"string\": spec.hosts in body must be of type array: \"string\"",
                ),
                error(
                    "FieldValueRequired",
                    "spec.http[0].directResponse.status",
                    "Required value"
                ),
                error(
                    "FieldValueInvalid",
                    "<nil>",
                    "Invalid value: \"\": \"spec.http[0].match[0].uri\" must validate one and only one schema \
                     (oneOf). Found 2 valid alternatives",
                ),
                error(
                    "FieldValueTypeInvalid",
                    "spec.http[0].route[0].weight",
                    "Invalid value: \"number\": spec.http[0].route[0].weight in body must be of type integer: \"number\"",
                ),
                error(
                    "FieldValueInvalid",
                    "spec.http[0].route[1].destination.port.number",
                    "Invalid value: -1: spec.http[0].route[1].destination.port.number in body should be greater than \
                     or equal to 0",
                ),
                cel_not_checked(),
            ])
        );
    }

    #[test]
    fn gateway_address_that_is_no_ip_fails_the_one_of_with_the_closest_alternative_explained() {
        let schema = storage_schema("gateway-api/gateways.yaml");
        let gateway = |address: &str| {
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "edge"},
                "spec": {
                    "gatewayClassName": "istio",
                    "addresses": [{"value": address}],
                    "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]
                }
            })
        };
        let admitted = schema.admit(gateway("10.0.0.1")).expect("an IPv4 address is admitted");
        assert_eq!(
            admitted["spec"]["addresses"],
            json!([{"type": "IPAddress", "value": "10.0.0.1"}])
        );
        assert_eq!(
            admitted["spec"]["listeners"],
            json!([{"name": "http", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "Same"}}}])
        );
        assert_eq!(
            schema.admit(gateway("not-an-ip")),
            Err(vec![
                error(
                    "FieldValueInvalid",
                    "<nil>",
                    "Invalid value: \"\": \"spec.addresses[0]\" must validate one and only one schema (oneOf). \
                     Found none valid",
                ),
                error(
                    "FieldValueInvalid",
                    "<nil>",
                    "Invalid value: \"\": \"spec.addresses[0].value\" must validate at least one schema (anyOf)",
                ),
                error(
                    "FieldValueTypeInvalid",
                    "spec.addresses[0].value",
                    "Invalid value: \"not-an-ip\": spec.addresses[0].value in body must be of type ipv4: \"not-an-ip\"",
                ),
                cel_not_checked(),
            ])
        );
    }

    #[test]
    fn istio_gateway_with_servers_is_admitted_unchanged() {
        let schema = storage_schema("istio/gateways.yaml");
        let object = json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "ingress"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]
            }
        });
        assert_eq!(schema.admit(object.clone()), Ok(object));
    }

    fn inline(schema: Value) -> Schema {
        Schema::new(&json!({"type": "object", "properties": {"spec": schema}})).expect("the schema compiles")
    }

    #[test]
    fn nulls_are_dropped_defaulted_or_kept_by_nullable_and_default() {
        let schema = inline(json!({
            "type": "object",
            "properties": {
                "plain": {"type": "string"},
                "defaulted": {"type": "string", "default": "fallback"},
                "nullable": {"type": "string", "nullable": true},
                "list": {"type": "array", "items": {"type": "string"}}
            }
        }));
        assert_eq!(
            schema.admit(json!({"spec": {"plain": null, "defaulted": null, "nullable": null}})),
            Ok(json!({"spec": {"defaulted": "fallback", "nullable": null}}))
        );
        assert_eq!(
            schema.admit(json!({"spec": {"list": ["a", null]}})),
            Err(vec![error(
                "FieldValueTypeInvalid",
                "spec.list[1]",
                "Invalid value: \"null\": spec.list[1] in body must be of type string: \"null\"",
            )])
        );
    }

    #[test]
    fn int_or_string_accepts_integers_and_strings_only() {
        let schema = inline(json!({
            "type": "object",
            "properties": {"port": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}}
        }));
        assert_eq!(
            schema.admit(json!({"spec": {"port": 80}})),
            Ok(json!({"spec": {"port": 80}}))
        );
        assert_eq!(
            schema.admit(json!({"spec": {"port": "http"}})),
            Ok(json!({"spec": {"port": "http"}}))
        );
        assert_eq!(
            schema.admit(json!({"spec": {"port": true}})),
            Err(vec![
                error(
                    "FieldValueTypeInvalid",
                    "spec.port",
                    "Invalid value: \"boolean\": spec.port in body must be of type integer,string: \"boolean\"",
                ),
                error(
                    "FieldValueInvalid",
                    "<nil>",
                    "Invalid value: \"\": \"spec.port\" must validate at least one schema (anyOf)",
                ),
                error(
                    "FieldValueTypeInvalid",
                    "spec.port",
                    "Invalid value: \"boolean\": spec.port in body must be of type integer: \"boolean\"",
                ),
            ])
        );
    }

    #[test]
    fn list_type_map_and_set_duplicates_are_reported_at_the_second_occurrence() {
        let schema = inline(json!({
            "type": "object",
            "properties": {
                "ports": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "port": {"type": "integer"}}}
                },
                "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}
            }
        }));
        let object = json!({"spec": {
            "ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 81}, {"name": "http", "port": 82}, {"name": "http", "port": 83}],
            "tags": ["a", "b", "a"]
        }});
        assert_eq!(
            schema.admit(object),
            Err(vec![
                error(
                    "FieldValueDuplicate",
                    "spec.ports[2]",
                    "Duplicate value: map[string]interface {}{\"name\":\"http\"}"
                ),
                error("FieldValueDuplicate", "spec.tags[2]", "Duplicate value: \"a\""),
            ])
        );
    }

    #[test]
    fn length_count_and_pattern_limits_use_the_apiserver_messages() {
        let schema = inline(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 3},
                "kind": {"type": "string", "minLength": 2, "pattern": "^[A-Z]"},
                "zone": {"type": "string", "pattern": "^[a-z]+$"},
                "items": {"type": "array", "maxItems": 1, "minItems": 1, "items": {"type": "integer", "maximum": 4294967295.0}},
                "ratio": {"type": "number", "exclusiveMaximum": true, "maximum": 1000000},
                "labels": {"type": "object", "maxProperties": 1, "additionalProperties": {"type": "string", "enum": ["x", 1]}}
            }
        }));
        let object = json!({"spec": {
            "name": "toolong",
            "kind": "a",
            "items": [4294967296_u64, 2],
            "ratio": 1000000.0,
            "labels": {"a": "y"},
            "zone": "Bad"
        }});
        assert_eq!(
            schema.admit(object),
            Err(vec![
                error(
                    "FieldValueInvalid",
                    "spec.items[0]",
                    "Invalid value: 4294967296: spec.items[0] in body should be less than or equal to 4294967295",
                ),
                error(
                    "FieldValueTooMany",
                    "spec.items",
                    "Too many: 2: must have at most 1 items"
                ),
                error(
                    "FieldValueInvalid",
                    "spec.kind",
                    "Invalid value: \"a\": spec.kind in body should be at least 2 chars long"
                ),
                error(
                    "FieldValueNotSupported",
                    "spec.labels.a",
                    "Unsupported value: \"y\": supported values: \"x\", \"1\""
                ),
                error(
                    "FieldValueTooLong",
                    "spec.name",
                    "Too long: may not be more than 3 bytes"
                ),
                error(
                    "FieldValueInvalid",
                    "spec.ratio",
                    "Invalid value: 1e+06: spec.ratio in body should be less than 1e+06",
                ),
                error(
                    "FieldValueInvalid",
                    "spec.zone",
                    "Invalid value: \"Bad\": spec.zone in body should match '^[a-z]+$'"
                ),
            ])
        );
    }

    #[test]
    fn schemas_that_are_not_structural_are_refused_with_the_reason() {
        let missing_type = Schema::new(&json!({"type": "object", "properties": {"spec": {"properties": {}}}}));
        assert_eq!(
            missing_type.err().map(|e| e.to_string()),
            Some("openAPIV3Schema.properties[spec].type: must not be empty for specified fields".to_owned())
        );
        let reference = Schema::new(&json!({"type": "object", "properties": {"spec": {"$ref": "#/definitions/x"}}}));
        assert!(matches!(
            reference,
            Err(SchemaError::Unsupported { keyword: "$ref", .. })
        ));
        let array_root = Schema::new(&json!({"type": "array", "items": {"type": "string"}}));
        assert_eq!(
            array_root.err().map(|e| e.to_string()),
            Some("openAPIV3Schema.type: must be object at the root, not \"array\"".to_owned())
        );
        let bad_pattern =
            Schema::new(&json!({"type": "object", "properties": {"spec": {"type": "string", "pattern": "("}}}));
        assert!(matches!(bad_pattern, Err(SchemaError::Pattern { .. })));
    }

    #[test]
    fn go_formatting_matches_fmt_and_strconv() {
        assert_eq!(go_float(4294967295.0), "4.294967295e+09");
        assert_eq!(go_float(100.0), "100");
        assert_eq!(go_float(123456.0), "123456");
        assert_eq!(go_float(0.5), "0.5");
        assert_eq!(go_float(-0.00001), "-1e-05");
        assert_eq!(go_float(1.5), "1.5");
        assert_eq!(go_quote("a\"b\\\n\u{1}é"), "\"a\\\"b\\\\\\n\\x01é\"");
    }
}
