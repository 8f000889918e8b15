//! Registry credentials of a CRI pull, as containerd 1.6's CRI `ParseAuth`: the
//! request's `AuthConfig` (or, without one, `registry.configs.<host>.auth`) is offered to
//! whichever host challenges (the reference's registry or a mirror of `hosts.toml`),
//! unless its `server_address` names another host.

use crate::api;
use crate::config::RegistryHostConfig;
use base64::Engine;
use berth_core::{Error, Result};
use berth_remotes::auth::CredentialsProvider;
use berth_remotes::hosts::AuthConfig;
use std::collections::BTreeMap;

/// The credentials of one pull.
pub struct PullCredentials {
    pub request: Option<api::AuthConfig>,
    /// `registry.configs` of the plugin's config, for hosts the request gives none for.
    pub configured: BTreeMap<String, RegistryHostConfig>,
}

impl CredentialsProvider for PullCredentials {
    fn credentials(&self, host: &str) -> Option<AuthConfig> {
        let from_config;
        let auth = match &self.request {
            Some(auth) => auth,
            None => {
                let configured = self.configured.get(host)?.auth.as_ref()?;
                from_config = api::AuthConfig {
                    username: configured.username.clone(),
                    password: configured.password.clone(),
                    auth: configured.auth.clone(),
                    identity_token: configured.identitytoken.clone(),
                    ..Default::default()
                };
                &from_config
            }
        };
        match parse_auth(auth, host) {
            Ok(credentials) => credentials,
            Err(e) => {
                tracing::warn!(host, error = %e, "CRI pull credentials unusable; pulling anonymously");
                None
            }
        }
    }
}

/// containerd's `ParseAuth`: username and password, else the identity token (sent as a
/// refresh token), else `auth` (base64 of `user:password`). The registry token is not
/// used, as in containerd 1.6. `None`: anonymous.
pub fn parse_auth(auth: &api::AuthConfig, host: &str) -> Result<Option<AuthConfig>> {
    if !auth.server_address.is_empty() && server_host(&auth.server_address)? != host {
        return Ok(None);
    }
    if !auth.username.is_empty() {
        return Ok(Some(AuthConfig {
            username: auth.username.clone(),
            password: auth.password.clone(),
            identity_token: String::new(),
        }));
    }
    if !auth.identity_token.is_empty() {
        return Ok(Some(AuthConfig {
            identity_token: auth.identity_token.clone(),
            ..Default::default()
        }));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim_end_matches('\0'))
            .map_err(|e| Error::invalid_argument(format!("auth: invalid base64: {e}")))?;
        let decoded = String::from_utf8_lossy(&decoded);
        let Some((user, password)) = decoded.split_once(':') else {
            return Err(Error::invalid_argument(
                "auth: invalid decoded auth (expected user:password)",
            ));
        };
        return Ok(Some(AuthConfig {
            username: user.to_string(),
            password: password.trim_matches('\0').to_string(),
            identity_token: String::new(),
        }));
    }
    Ok(None)
}

/// The host of `server_address` as Go's `url.Parse(..).Host` gives it: the authority of
/// `scheme://host/…` or `//host/…`; a bare `host:port` is a parse error there and a bare
/// name has no host (so it matches nothing).
fn server_host(address: &str) -> Result<String> {
    let authority = match address.split_once("://") {
        Some((_, rest)) => Some(rest),
        None => address.strip_prefix("//"),
    };
    match authority {
        Some(rest) => Ok(rest.split('/').next().unwrap_or_default().to_string()),
        None if address.split('/').next().unwrap_or_default().contains(':') => {
            Err(Error::invalid_argument(format!(
                "parse server address {address:?}: first path segment in URL cannot contain colon"
            )))
        }
        None => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(f: impl FnOnce(&mut api::AuthConfig)) -> api::AuthConfig {
        let mut a = api::AuthConfig::default();
        f(&mut a);
        a
    }

    #[test]
    fn forms_of_auth_as_containerd() {
        let basic = parse_auth(
            &auth(|a| {
                a.username = "u".into();
                a.password = "p".into();
            }),
            "r.io",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (basic.username.as_str(), basic.password.as_str()),
            ("u", "p")
        );

        let encoded = base64::engine::general_purpose::STANDARD.encode("me:sec:ret");
        let from_auth = parse_auth(&auth(|a| a.auth = encoded), "r.io")
            .unwrap()
            .unwrap();
        assert_eq!(
            (from_auth.username.as_str(), from_auth.password.as_str()),
            ("me", "sec:ret")
        );

        let token = parse_auth(&auth(|a| a.identity_token = "t".into()), "r.io")
            .unwrap()
            .unwrap();
        assert_eq!(token.identity_token, "t");
        assert!(token.username.is_empty());

        assert!(
            parse_auth(&auth(|a| a.registry_token = "t".into()), "r.io")
                .unwrap()
                .is_none()
        );
        assert!(parse_auth(&auth(|a| a.auth = "!!".into()), "r.io").is_err());
    }

    #[test]
    fn server_address_limits_the_host() {
        let for_host = |address: &str| {
            auth(|a| {
                a.username = "u".into();
                a.server_address = address.into();
            })
        };
        assert!(
            parse_auth(&for_host("https://r.io"), "r.io")
                .unwrap()
                .is_some()
        );
        assert!(
            parse_auth(&for_host("https://other.io/v2/"), "r.io")
                .unwrap()
                .is_none()
        );
        assert!(parse_auth(&for_host("r.io"), "r.io").unwrap().is_none());
        assert!(parse_auth(&for_host("r.io:5000"), "r.io:5000").is_err());
    }
}
