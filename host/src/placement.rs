//! `xenod deploy REF --place auto|EXPR [--replicas N] [--spread LABEL |
//! --pack] [--dry-run]`: placement (see `place`) over this host and the
//! hosts it knows from their advertisements, then a deploy on each host
//! chosen: here in the daemon, elsewhere over the migration wire
//! ([`Wire::Deploy`]), which the chosen host serves only to nodes it
//! allows (`xenod allow`). The chosen host fetches only what it lacks.
//!
//! A chosen host that fails (dead, refusing the requester, its deploy
//! failing) is left for the next host in the ranking, and the report says
//! so; when no host is left the deploy fails with [`Exit::NoHost`].
//!
//! What placement needs of the stack (its layers and their sizes, its
//! deploy spec) it reads from the store; a stack this host does not hold
//! has its manifests fetched first (from the hosts that announced it),
//! and nothing of its file data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use xenod_peer::{EndpointAddr, FetchOptions, format_peer};
use xenod_store::{Exit, LayerId};

use crate::daemon::Daemon;
use crate::daemon::announce::{HOST_EXPIRY, own_attrs};
use crate::error::{Context, Error, Result};
use crate::instance::{DeployOptions, stack_spec};
use crate::migrate::wire::{ALPN, Wire, call};
use crate::place::{self, Ask, Candidate, Decision, PlaceError};
use crate::{filter, note};

/// What `deploy --place` asks, beside the deploy's own options.
#[derive(Clone, Debug)]
pub struct PlaceArgs {
    /// `auto`, or a filter expression hosts must match.
    pub place: String,
    pub replicas: u32,
    pub spread: Option<String>,
    pub pack: bool,
    pub dry_run: bool,
}

/// A host that failed when chosen.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    pub node: String,
    pub error: String,
}

/// Places and deploys `target`; the report holds the decision (every
/// candidate's score, each removed host's filter), the instances
/// deployed with their hosts, and the hosts that failed.
pub async fn deploy(d: &Arc<Daemon>, target: &str, args: &PlaceArgs, options: DeployOptions) -> Result<Value> {
    if args.spread.is_some() && args.pack {
        return Err(Error::coded(Exit::Usage, "--spread and --pack exclude each other"));
    }
    let expr = match args.place.as_str() {
        "auto" | "" => None,
        e => Some(filter::parse(e).map_err(|err| Error::coded(Exit::Usage, format!("--place {e:?}: {err}")))?),
    };
    let top = stack_known_here(d, target).await?;
    let store = d.store_arc();
    let stack = store.stack(&top)?;
    let layers = store.layers()?;
    let sizes: BTreeMap<LayerId, u64> = layers.iter().map(|(id, i)| (*id, i.file_bytes)).collect();
    let spec = stack_spec(&store, &top)?.ok_or_else(|| {
        Error::coded(Exit::BadInput, format!("{target} carries no deploy spec: placement cannot size the guest"))
    })?;
    let uri = options.uri.clone().unwrap_or_else(xenod_deployer::default_uri);
    let ask = Ask {
        mem: u64::from(options.memory.unwrap_or(spec.memory_mib)) << 20,
        vcpus: spec.vcpus,
        hv: hypervisor_kind(&uri),
        stack: stack.iter().map(|l| (*l, sizes.get(l).copied().unwrap_or(0))).collect(),
        replicas: args.replicas.max(1),
        spread: args.spread.clone(),
        pack: args.pack,
    };
    let (hosts, addrs) = candidates(d);
    let decision = place::place(&hosts, &ask, expr.as_ref()).map_err(|e| match e {
        PlaceError::Expr(_) => Error::coded(Exit::Usage, e.to_string()),
        e => Error::coded(Exit::NoHost, e.to_string()),
    })?;
    let mut report = json!({ "layer": top.to_string(), "placement": &decision, "dry_run": args.dry_run });
    if args.dry_run {
        return Ok(report);
    }
    let base = options
        .name
        .clone()
        .or_else(|| spec.instance.clone())
        .unwrap_or_else(|| format!("xenod-{}", &top.to_string()[..8]));
    let mut tried: Vec<String> = Vec::new();
    let mut attempts = Vec::new();
    let mut instances = Vec::new();
    for (r, &first) in decision.chosen.iter().enumerate() {
        let name = if ask.replicas > 1 { format!("{base}-{}", r + 1) } else { base.clone() };
        let mut o = options.clone();
        (o.name, o.replicas) = (Some(name.clone()), 1);
        if ask.replicas > 1 {
            o.ports.iter_mut().for_each(|p| p.host = 0);
        }
        let mut next = Some(decision.ranked[first].node.clone());
        while let Some(node) = next.take() {
            tried.push(node.clone());
            note(format!("deploying {name} on {}", place::short(&node)));
            match deploy_on(d, &node, addrs.get(&node), top, &o).await {
                Ok(v) => instances.push(json!({ "host": node, "instance": v })),
                Err(e) => {
                    let error = e.chain();
                    next = next_candidate(&decision, &tried);
                    let then =
                        next.as_deref().map_or("no host is left".into(), |n| format!("trying {}", place::short(n)));
                    note(format!("{} failed: {error}; {then}", place::short(&node)));
                    attempts.push(Attempt { node, error });
                }
            }
        }
    }
    report["instances"] = json!(instances);
    report["failed"] = json!(attempts);
    if instances.len() < ask.replicas as usize {
        let why = attempts.iter().map(|a| format!("{}: {}", place::short(&a.node), a.error)).collect::<Vec<_>>();
        return Err(Error::coded(
            Exit::NoHost,
            format!(
                "{} of {} replicas deployed; every host left failed ({})",
                instances.len(),
                ask.replicas,
                why.join("; ")
            ),
        ));
    }
    Ok(report)
}

/// The best host that passed the filters and was not tried yet.
fn next_candidate(decision: &Decision, tried: &[String]) -> Option<String> {
    decision.spares().into_iter().map(|s| s.node.clone()).find(|n| !tried.contains(n))
}

/// The hypervisor kind a libvirt URI needs.
fn hypervisor_kind(uri: &str) -> Option<String> {
    let scheme = uri.split([':', '+']).next().unwrap_or("");
    match scheme {
        "qemu" => Some("qemu".into()),
        "xen" => Some("xen".into()),
        _ => None,
    }
}

/// This host and every live advertised one, with the addresses to reach
/// the others.
fn candidates(d: &Daemon) -> (Vec<Candidate>, BTreeMap<String, EndpointAddr>) {
    let own: Vec<LayerId> = d
        .store()
        .layers()
        .map(|l| l.into_iter().filter(|(_, i)| !i.partial).map(|(id, _)| id).collect())
        .unwrap_or_default();
    let me = d.node().id().to_string();
    let mut hosts = vec![Candidate::new(me, own_attrs(d), own, true)];
    let mut addrs = BTreeMap::new();
    let expiry = d.config().host_expiry_secs.map_or(HOST_EXPIRY, Duration::from_secs);
    for (p, _) in d.node().hosts(expiry) {
        let (Some(addr), Some(attrs)) = (p.addr(), p.attrs.clone()) else { continue };
        let node = addr.id.to_string();
        hosts.push(Candidate::new(node.clone(), attrs, p.layers.clone(), false));
        addrs.insert(node, addr);
    }
    (hosts, addrs)
}

/// The top layer of `target`, its stack's layer records here: resolved
/// from this store, or fetched (manifests only) from a ticket's providers
/// or the hosts that announced it.
async fn stack_known_here(d: &Arc<Daemon>, target: &str) -> Result<LayerId> {
    if let Ok(top) = d.store().resolve(target)
        && d.store().stack(&top).is_ok()
    {
        return Ok(top);
    }
    let (top, mut providers) = if target.starts_with("xenod1") {
        let t: xenod_peer::Ticket = target.parse()?;
        (t.layer, t.providers)
    } else {
        (d.store().resolve(target)?, Vec::new())
    };
    providers.extend(d.node().providers_of(&top));
    providers.extend(d.default_peers());
    note(format!("fetching the manifests of {top} to size it"));
    let opts = FetchOptions { manifests_only: true, ..FetchOptions::default() };
    d.node().fetch(top, &providers, opts).await.with_context(|| format!("the manifests of {target}"))?;
    Ok(top)
}

/// Deploys `top` on `node`: here, or on the host at `addr`.
async fn deploy_on(
    d: &Arc<Daemon>,
    node: &str,
    addr: Option<&EndpointAddr>,
    top: LayerId,
    o: &DeployOptions,
) -> Result<Value> {
    if node == d.node().id().to_string() {
        // What placement fetched here was the manifests; the rest now.
        d.fetch(&top.to_string(), &[], false, None).await?;
        let (instances, o) = (d.instances().clone(), o.clone());
        let v = tokio::task::spawn_blocking(move || instances.deploy(&top.to_string(), &o)).await??;
        if let Some(e) = v["errors"].as_array().and_then(|e| e.first()) {
            return Err(Error::msg(format!("deploying here: {}", e.as_str().unwrap_or("failed"))));
        }
        return Ok(v["instances"][0].clone());
    }
    let addr = addr.ok_or_else(|| Error::msg(format!("no address is known for {node}")))?;
    let conn =
        match tokio::time::timeout(Duration::from_secs(10), d.node().endpoint().connect(addr.clone(), ALPN)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Error::msg(format!("connecting: {e}"))),
            Err(_) => return Err(Error::msg("connecting: timed out after 10 s")),
        };
    let mut o = o.clone();
    // Accounting bills the one who asked, wherever the guest lands.
    o.owner.get_or_insert_with(|| d.instances().default_owner());
    let req = Wire::Deploy { layer: top, source: format_peer(&d.node().addr()), options: Box::new(o) };
    let v = call(&conn, &req, |_| {}).await?;
    conn.close(0u32.into(), b"done");
    let mut inst = v["deploy"]["instances"][0].clone();
    inst["fetch"] = v["fetch"].clone();
    Ok(inst)
}
