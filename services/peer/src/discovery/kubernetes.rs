//! Kubernetes discovery: a kube-rs watcher on the EndpointSlices of the blob headless Service
//! (label `kubernetes.io/service-name=<service>`) in one namespace. It needs exactly get, list
//! and watch on `endpointslices`.
//!
//! The watcher lists, then watches from the list's resourceVersion; after an error (a dropped
//! connection, an undecodable event) it retries with backoff, and after `410 Gone` it lists
//! again. A fresh list replaces the whole set of slices, so nothing stale survives a re-list.

use std::collections::BTreeMap;

use futures_util::{StreamExt, future::BoxFuture};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use peervault_proto::v1::MemberSource;
use tracing::Instrument;

use super::{Discovery, DiscoverySink};
use crate::{error::PeerError, registry::Discovered};

/// Where the service account's namespace is mounted in a pod.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Watches the EndpointSlices of one Service.
pub struct KubernetesDiscovery {
    api: Api<EndpointSlice>,
    namespace: String,
    service: String,
    port_name: String,
}

impl KubernetesDiscovery {
    /// Watches `service` in `namespace` through `client`.
    pub fn new(client: Client, namespace: &str, service: &str, port_name: &str) -> Self {
        KubernetesDiscovery {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            service: service.to_string(),
            port_name: port_name.to_string(),
        }
    }

    /// In-cluster configuration (or a kubeconfig outside a cluster); the namespace defaults to
    /// the pod's own.
    pub async fn from_environment(
        namespace: Option<&str>,
        service: Option<&str>,
        port_name: &str,
    ) -> Result<Self, PeerError> {
        let service = service.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            PeerError::Config("--discovery kubernetes needs --kube-service (the blob headless Service)".into())
        })?;
        let (client, namespace) = client_from_environment("--discovery kubernetes", namespace).await?;
        Ok(Self::new(client, &namespace, service, port_name))
    }
}

/// A client from the in-cluster configuration (or a kubeconfig), and the namespace to use:
/// `namespace` when given, else the pod's own, else the configuration's default.
pub async fn client_from_environment(what: &str, namespace: Option<&str>) -> Result<(Client, String), PeerError> {
    let client = Client::try_default().await.map_err(|e| {
        PeerError::Config(format!(
            "{what}: no Kubernetes configuration (in-cluster service account or kubeconfig): {e}"
        ))
    })?;
    let namespace = match namespace {
        Some(ns) => ns.to_string(),
        None => std::fs::read_to_string(NAMESPACE_FILE)
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string()),
    };
    Ok((client, namespace))
}

/// The endpoints of a set of slices. A pod is identified by its name (`targetRef`), else its
/// `hostname`, else `ip:port`; it is dialled by its stable DNS name
/// `<hostname>.<service>.<namespace>.svc` when it has a hostname (StatefulSet pods), else by IP.
/// Terminating endpoints and endpoints whose `ready` condition is false are kept, not ready.
pub fn endpoints_of<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    namespace: &str,
    service: &str,
    port_name: &str,
) -> Vec<Discovered> {
    let mut out: BTreeMap<String, Discovered> = BTreeMap::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name))
            .or_else(|| ports.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        let Some(port) = port else { continue };
        for ep in slice.endpoints.as_deref().unwrap_or_default() {
            let Some(ip) = ep.addresses.first() else { continue };
            let cond = ep.conditions.clone().unwrap_or_default();
            // `ready` unset means unknown, which the API says to treat as ready.
            let ready = cond.ready.unwrap_or(true) && !cond.terminating.unwrap_or(false);
            let id = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .or_else(|| ep.hostname.clone())
                .unwrap_or_else(|| crate::registry::join_host_port(ip, port));
            let address = match &ep.hostname {
                Some(h) if !h.is_empty() => format!("{h}.{service}.{namespace}.svc"),
                _ => ip.clone(),
            };
            let mut metadata = BTreeMap::from([
                ("ip".to_string(), ip.clone()),
                ("endpointslice".to_string(), slice.name_any()),
            ]);
            if let Some(z) = &ep.zone {
                metadata.insert("zone".into(), z.clone());
            }
            if let Some(n) = &ep.node_name {
                metadata.insert("node".into(), n.clone());
            }
            let d = Discovered {
                id: id.clone(),
                address,
                port,
                ready,
                zone: ep.zone.clone().unwrap_or_default(),
                node_name: ep.node_name.clone().unwrap_or_default(),
                metadata,
                source: MemberSource::Kubernetes,
            };
            // A pod listed in two slices (dual stack) is ready when either says so.
            out.entry(id).and_modify(|prev| prev.ready |= d.ready).or_insert(d);
        }
    }
    out.into_values().collect()
}

impl Discovery for KubernetesDiscovery {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn run(self: Box<Self>, sink: DiscoverySink) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let selector = format!("kubernetes.io/service-name={}", self.service);
            let span = tracing::info_span!("endpointslice_watch", namespace = %self.namespace, selector = %selector);
            async move {
                let cfg = watcher::Config::default().labels(&selector);
                let mut stream = watcher(self.api.clone(), cfg).default_backoff().boxed();
                let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
                let mut relist: Option<BTreeMap<String, EndpointSlice>> = None;
                let report = |slices: &BTreeMap<String, EndpointSlice>| {
                    sink.report(endpoints_of(
                        slices.values(),
                        &self.namespace,
                        &self.service,
                        &self.port_name,
                    ))
                };
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(watcher::Event::Init) => {
                            tracing::debug!("listing EndpointSlices");
                            relist = Some(BTreeMap::new());
                        }
                        Ok(watcher::Event::InitApply(s)) => {
                            if let Some(buf) = relist.as_mut() {
                                buf.insert(s.name_any(), s);
                            }
                        }
                        Ok(watcher::Event::InitDone) => {
                            if let Some(buf) = relist.take() {
                                slices = buf;
                            }
                            tracing::info!(slices = slices.len(), "EndpointSlices listed");
                            report(&slices);
                        }
                        Ok(watcher::Event::Apply(s)) => {
                            slices.insert(s.name_any(), s);
                            report(&slices);
                        }
                        Ok(watcher::Event::Delete(s)) => {
                            slices.remove(&s.name_any());
                            report(&slices);
                        }
                        Err(e) => sink.error(&e),
                    }
                }
            }
            .instrument(span)
            .await
        })
    }
}
