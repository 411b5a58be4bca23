//! The gateway's authenticator in the binary: the runtime's authorizer, so WebSocket clients
//! present the same credentials as gRPC callers (client certificate, API key, JWT with `read`),
//! get the same [`Caller`] (key prefix included) and lose their connection when the credential
//! is revoked or expires. Refusals are counted in `peervault_auth_failures_total` like gRPC's.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use peervault_runtime::{
    Caller,
    auth::{Authorizer, Scope},
    identity::ConnInfo,
};

use super::TokenValidator;

/// [`TokenValidator`] backed by the process's [`Authorizer`].
pub struct RuntimeAuth(pub Arc<Authorizer>);

impl TokenValidator for RuntimeAuth {
    fn validate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, String>> {
        Box::pin(async move {
            self.0
                .authenticate_token_remote(token, Scope::Read)
                .await
                .map_err(|(st, _)| st.message().to_string())
        })
    }

    fn certificate(&self, conn: &ConnInfo) -> Option<Result<Caller, String>> {
        self.0
            .authenticate_connection(Some(conn), None)
            .map_err(|(st, _)| st.message().to_string())
            .transpose()
    }

    fn revalidate(&self, caller: &Caller) -> Result<(), String> {
        self.0.revalidate(caller).map_err(|(st, _)| st.message().to_string())
    }
}
