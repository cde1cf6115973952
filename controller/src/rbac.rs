//! Roles, bindings and the check every admin API call makes.
//!
//! A request's API token names a subject (`user:NAME` or
//! `serviceaccount:NAME`); the role bindings of that subject give it roles;
//! a role's rules allow verbs on resources. Anything not allowed is denied,
//! and the caller is told which permission was missing.
//!
//! | role | allows |
//! |---|---|
//! | `admin` | everything |
//! | `operator` | links and join tokens (all verbs); reading agents, relays and the status |
//! | `viewer` | `get` and `list` on everything |
//! | `relay-operator` | relays (all verbs), relay join tokens; reading the status |

use comsat_protocol::api::{Rule, valid_name};

/// Every resource, as rules name them.
pub const RESOURCES: &[&str] = &[
    "agents",
    "relays",
    "links",
    "tokens",
    "roles",
    "rolebindings",
    "serviceaccounts",
    "users",
    "audit",
    "status",
];

/// Every verb.
pub const VERBS: &[&str] = &["get", "list", "create", "update", "delete"];

/// Most rules in a role, and resources or verbs in a rule.
pub const MAX_RULES: usize = 64;

fn rule(resources: &[&str], verbs: &[&str]) -> Rule {
    Rule {
        resources: resources.iter().map(|s| (*s).to_owned()).collect(),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// The built-in roles.
pub fn builtin_roles() -> Vec<(&'static str, Vec<Rule>)> {
    vec![
        ("admin", vec![rule(&["*"], &["*"])]),
        (
            "operator",
            vec![
                rule(&["links", "tokens"], &["*"]),
                rule(&["agents", "relays", "status"], &["get", "list"]),
            ],
        ),
        ("viewer", vec![rule(&["*"], &["get", "list"])]),
        (
            "relay-operator",
            vec![
                rule(&["relays", "tokens/relay"], &["*"]),
                rule(&["status"], &["get"]),
            ],
        ),
    ]
}

/// The rules of built-in role `name`.
pub fn builtin(name: &str) -> Option<Vec<Rule>> {
    builtin_roles()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| r)
}

/// Whether `rules` allow `verb` on `resource` (`tokens/relay` is covered by
/// a rule naming `tokens`).
pub fn allows(rules: &[Rule], resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        let resource_ok = r.resources.iter().any(|x| {
            x == "*"
                || x == resource
                || resource
                    .strip_prefix(x.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        let verb_ok = r.verbs.iter().any(|v| v == "*" || v == verb);
        resource_ok && verb_ok
    })
}

/// Checks a role's rules, naming what is wrong.
pub fn check_rules(rules: &[Rule]) -> Result<(), String> {
    if rules.is_empty() || rules.len() > MAX_RULES {
        return Err(format!("a role has 1 to {MAX_RULES} rules"));
    }
    for (i, r) in rules.iter().enumerate() {
        if r.resources.is_empty() || r.verbs.is_empty() {
            return Err(format!(
                "rule {}: name at least one resource and one verb",
                i + 1
            ));
        }
        if r.resources.len() > MAX_RULES || r.verbs.len() > MAX_RULES {
            return Err(format!("rule {}: too many entries", i + 1));
        }
        for x in &r.resources {
            let base = x.split('/').next().unwrap_or_default();
            let sub_ok = match x.split_once('/') {
                None => true,
                Some(("tokens", kind)) => kind == "agent" || kind == "relay",
                Some(_) => false,
            };
            if x != "*" && (!RESOURCES.contains(&base) || !sub_ok) {
                return Err(format!(
                    "rule {}: unknown resource `{x}` (use {}, tokens/agent, tokens/relay or *)",
                    i + 1,
                    RESOURCES.join(", ")
                ));
            }
        }
        for v in &r.verbs {
            if v != "*" && !VERBS.contains(&v.as_str()) {
                return Err(format!(
                    "rule {}: unknown verb `{v}` (use {} or *)",
                    i + 1,
                    VERBS.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Checks a role, binding or account name.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} name `{name}`: 1 to {} characters of a-z, 0-9 and -, not starting or ending \
             with -",
            comsat_protocol::api::MAX_NAME_LEN
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_resources_verbs_and_wildcards() {
        let admin = builtin("admin").expect("admin");
        assert!(allows(&admin, "links", "delete"));
        assert!(allows(&admin, "tokens/relay", "create"));
        let viewer = builtin("viewer").expect("viewer");
        assert!(allows(&viewer, "audit", "list"));
        assert!(!allows(&viewer, "links", "create"));
        let relay_op = builtin("relay-operator").expect("relay-operator");
        assert!(allows(&relay_op, "tokens/relay", "create"));
        assert!(!allows(&relay_op, "tokens/agent", "create"));
        assert!(!allows(&relay_op, "links", "list"));
        let operator = builtin("operator").expect("operator");
        assert!(allows(&operator, "tokens/agent", "create"));
        assert!(allows(&operator, "tokens/relay", "create"));
        assert!(!allows(&operator, "roles", "list"));
        // A prefix is not a parent.
        assert!(!allows(&[rule(&["token"], &["*"])], "tokens", "create"));
        assert!(!allows(&[], "links", "get"), "deny by default");
    }

    #[test]
    fn bad_rules_are_named() {
        assert!(check_rules(&[]).is_err());
        let e = check_rules(&[rule(&["lnks"], &["get"])]).expect_err("resource");
        assert!(e.contains("`lnks`"), "{e}");
        let e = check_rules(&[rule(&["links"], &["read"])]).expect_err("verb");
        assert!(e.contains("`read`"), "{e}");
        let e = check_rules(&[rule(&["tokens/other"], &["get"])]).expect_err("sub");
        assert!(e.contains("tokens/other"), "{e}");
        assert!(check_rules(&[rule(&["tokens/relay", "links"], &["get", "list"])]).is_ok());
        for (_, rules) in builtin_roles() {
            assert!(check_rules(&rules).is_ok());
        }
    }
}
