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
//!
//! No escalation, as Kubernetes does it: a caller may create a role only
//! with permissions it holds itself, and bind a role only if it holds every
//! permission the role grants, unless it holds `escalate` (creating) or
//! `bind` (binding) on `roles`. Minting a token for an account needs every
//! permission that account holds. [`first_uncovered`] is that check.

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
    "flows",
    "bundles",
    "status",
    "metrics",
];

/// Every verb. `escalate` and `bind` mean something on `roles` only: the
/// holder may create, or bind, roles that grant more than it holds itself.
pub const VERBS: &[&str] = &[
    "get", "list", "create", "update", "delete", "escalate", "bind",
];

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

/// The first permission (resource, verb) that `wanted` grants and `held`
/// does not, or `None` when `held` covers all of `wanted`. A wildcard is
/// covered only by a wildcard: `*` on `links` needs `*` on `links` (or on
/// `*`), not each verb one by one, so a role made today cannot grow with
/// verbs or resources added later.
pub fn first_uncovered<'a>(held: &[Rule], wanted: &'a [Rule]) -> Option<(&'a str, &'a str)> {
    wanted.iter().find_map(|r| {
        r.resources.iter().find_map(|resource| {
            r.verbs
                .iter()
                .find(|verb| !allows(held, resource, verb))
                .map(|verb| (resource.as_str(), verb.as_str()))
        })
    })
}

/// A role, binding or account that [`check_rules`] or [`check_name`]
/// refused: the message names the rule or name and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RbacError {
    /// No rule, or more than [`MAX_RULES`].
    #[error("a role has 1 to {MAX_RULES} rules")]
    RuleCount,
    /// A rule without a resource or without a verb.
    #[error("rule {rule}: name at least one resource and one verb")]
    EmptyRule {
        /// The rule's position, from 1.
        rule: usize,
    },
    /// A rule with more than [`MAX_RULES`] resources or verbs.
    #[error("rule {rule}: too many entries")]
    LongRule {
        /// The rule's position, from 1.
        rule: usize,
    },
    /// A resource that is not in [`RESOURCES`].
    #[error(
        "rule {rule}: unknown resource `{resource}` (use {}, tokens/agent, tokens/relay or *)",
        RESOURCES.join(", ")
    )]
    UnknownResource {
        /// The rule's position, from 1.
        rule: usize,
        /// The resource named.
        resource: String,
    },
    /// A verb that is not in [`VERBS`].
    #[error("rule {rule}: unknown verb `{verb}` (use {} or *)", VERBS.join(", "))]
    UnknownVerb {
        /// The rule's position, from 1.
        rule: usize,
        /// The verb named.
        verb: String,
    },
    /// A name that [`valid_name`] refuses.
    #[error(
        "{what} name `{name}`: 1 to {} characters of a-z, 0-9 and -, not starting or ending \
         with -",
        comsat_protocol::api::MAX_NAME_LEN
    )]
    InvalidName {
        /// What is named: `role`, `role binding`, `user`, …
        what: String,
        /// The name given.
        name: String,
    },
}

/// Checks a role's rules, naming what is wrong.
pub fn check_rules(rules: &[Rule]) -> Result<(), RbacError> {
    if rules.is_empty() || rules.len() > MAX_RULES {
        return Err(RbacError::RuleCount);
    }
    for (i, r) in rules.iter().enumerate() {
        let rule = i + 1;
        if r.resources.is_empty() || r.verbs.is_empty() {
            return Err(RbacError::EmptyRule { rule });
        }
        if r.resources.len() > MAX_RULES || r.verbs.len() > MAX_RULES {
            return Err(RbacError::LongRule { rule });
        }
        for x in &r.resources {
            let base = x.split('/').next().unwrap_or_default();
            let sub_ok = match x.split_once('/') {
                None => true,
                Some(("tokens", kind)) => kind == "agent" || kind == "relay",
                Some(_) => false,
            };
            if x != "*" && (!RESOURCES.contains(&base) || !sub_ok) {
                return Err(RbacError::UnknownResource {
                    rule,
                    resource: x.clone(),
                });
            }
        }
        for v in &r.verbs {
            if v != "*" && !VERBS.contains(&v.as_str()) {
                return Err(RbacError::UnknownVerb {
                    rule,
                    verb: v.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Checks a role, binding or account name.
pub fn check_name(what: &str, name: &str) -> Result<(), RbacError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(RbacError::InvalidName {
            what: what.to_owned(),
            name: name.to_owned(),
        })
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
    fn only_what_is_held_is_covered() {
        let admin = builtin("admin").expect("admin");
        let operator = builtin("operator").expect("operator");
        let viewer = builtin("viewer").expect("viewer");
        for (_, rules) in builtin_roles() {
            assert_eq!(first_uncovered(&admin, &rules), None, "admin holds all");
        }
        assert_eq!(first_uncovered(&operator, &operator), None);
        assert_eq!(
            first_uncovered(&operator, &admin),
            Some(("*", "*")),
            "a wildcard needs a wildcard"
        );
        assert_eq!(first_uncovered(&viewer, &operator), Some(("links", "*")));
        // `*` verbs on links are held, but `*` on `*` is not.
        let links_all = [rule(&["links"], &["*"])];
        assert_eq!(
            first_uncovered(&links_all, &[rule(&["links"], &["delete"])]),
            None
        );
        assert_eq!(
            first_uncovered(&links_all, &[rule(&["links", "relays"], &["get"])]),
            Some(("relays", "get"))
        );
        // Every verb of a resource one by one is not `*` on it.
        let each: Vec<&str> = VERBS.to_vec();
        assert_eq!(
            first_uncovered(&[rule(&["links"], &each)], &links_all),
            Some(("links", "*"))
        );
        // A token kind is covered by `tokens`, not the other way round.
        let tokens = [rule(&["tokens"], &["create"])];
        let relay_tokens = [rule(&["tokens/relay"], &["create"])];
        assert_eq!(first_uncovered(&tokens, &relay_tokens), None);
        assert_eq!(
            first_uncovered(&relay_tokens, &tokens),
            Some(("tokens", "create"))
        );
        assert_eq!(first_uncovered(&[], &[]), None);
    }

    #[test]
    fn bad_rules_are_named() {
        assert!(check_rules(&[]).is_err());
        let e = check_rules(&[rule(&["lnks"], &["get"])])
            .expect_err("resource")
            .to_string();
        assert!(e.contains("`lnks`"), "{e}");
        let e = check_rules(&[rule(&["links"], &["read"])])
            .expect_err("verb")
            .to_string();
        assert!(e.contains("`read`"), "{e}");
        let e = check_rules(&[rule(&["tokens/other"], &["get"])])
            .expect_err("sub")
            .to_string();
        assert!(e.contains("tokens/other"), "{e}");
        assert!(check_rules(&[rule(&["tokens/relay", "links"], &["get", "list"])]).is_ok());
        for (_, rules) in builtin_roles() {
            assert!(check_rules(&rules).is_ok());
        }
    }
}
