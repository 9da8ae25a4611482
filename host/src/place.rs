//! Placement: which hosts take a deploy. Two steps, as Nova's and Nomad's
//! schedulers take them: filters remove the hosts that cannot take the
//! guest, weights rank the others.
//!
//! ```text
//! filters, in order     expr        the command line's --place EXPR (see `filter`)
//!                       hypervisor  the host runs the kind the deploy's libvirt URI needs
//!                                   (qemu:// -> qemu, xen:// -> xen; both roots, fs and disk)
//!                       vcpus       at least the spec's vCPUs
//!                       memory      memory free (after what the host admitted) >= the spec's
//! weights, per host     locality    1 - bytes of the stack it lacks / the stack's bytes   x 1.0
//!                       capacity    memory free after the guest / memory total            x 0.1
//!                                   (--pack: 1 - that, to fill hosts before others)
//!                       spread      with --spread LABEL: 1 / (1 + replicas already placed
//!                                   on hosts with this host's LABEL value)                 x 4.0
//! ```
//!
//! Locality is what no other scheduler weighs: a host that holds most of a
//! stack's chunks deploys it almost for free, so the bytes it lacks count
//! ten times the capacity. Spread, when asked for, counts most: replicas go
//! to distinct LABEL values while there are unused ones, and among those to
//! the host with the fewest bytes to fetch. Without `--pack` each replica
//! goes to its own host; with it, a host takes replicas while its memory
//! lasts. Ties go to the node id that sorts first, so a decision is the
//! same on every host that makes it.
//!
//! Bytes a host lacks come from the layer summaries hosts advertise
//! (which layers each holds), weighed by the layers' sizes; chunks shared
//! between layers are not counted apart.

use std::collections::BTreeMap;

use serde::Serialize;
use xenod_peer::HostAttrs;
use xenod_store::LayerId;

use crate::filter::{Attr, Filter};

/// The weights (see the module's table).
pub const W_LOCALITY: f64 = 1.0;
pub const W_CAPACITY: f64 = 0.1;
/// Above locality and capacity together: a host in an unused LABEL value
/// beats one holding the whole stack in a used one.
pub const W_SPREAD: f64 = 4.0;
/// Most hosts a decision reports (the chosen ones first), and most removed
/// hosts it names (each filter's count covers them all).
pub const MAX_RANKED: usize = 64;
pub const MAX_REMOVED: usize = 64;

/// A host placement may choose.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub node: String,
    pub attrs: HostAttrs,
    /// The layers it holds, sorted by their first 8 bytes (`keys`, the
    /// same order), so a lookup compares integers, not 32-byte ids.
    layers: Vec<LayerId>,
    keys: Vec<u64>,
    pub this_host: bool,
}

fn key(l: &LayerId) -> u64 {
    u64::from_be_bytes(l.as_bytes()[..8].try_into().unwrap_or_default())
}

impl Candidate {
    pub fn new(node: String, attrs: HostAttrs, mut layers: Vec<LayerId>, this_host: bool) -> Self {
        layers.sort_unstable();
        layers.dedup();
        let keys = layers.iter().map(key).collect();
        Self { node, attrs, layers, keys, this_host }
    }

    /// The attribute `name` as a filter sees it: the advertised ones,
    /// `node`, `layers` (how many it holds) and `label.KEY`.
    pub fn attr(&self, name: &str) -> Option<Attr<'_>> {
        host_attr(&self.node, self.layers.len(), &self.attrs, name)
    }

    fn holds(&self, l: &LayerId) -> bool {
        // Ids sorted are sorted by their first bytes too; ids sharing those
        // sit together, and are told apart whole.
        let k = key(l);
        let from = self.keys.partition_point(|&x| x < k);
        self.keys[from..].iter().zip(&self.layers[from..]).take_while(|(x, _)| **x == k).any(|(_, id)| id == l)
    }
}

/// Attribute `name` of a host: `node`, `layers` (how many it holds), the
/// advertised ones, `label.KEY`.
pub fn host_attr<'a>(node: &'a str, layers: usize, a: &'a HostAttrs, name: &str) -> Option<Attr<'a>> {
    Some(match name {
        "node" => Attr::Text(node.into()),
        "layers" => Attr::Num(layers as f64),
        "hv" => Attr::List(a.hv.as_slice().into()),
        "vcpus" => Attr::Num(f64::from(a.vcpus)),
        "mem_total" => Attr::Num(a.mem_total as f64),
        "mem_free" => Attr::Num(a.mem_free as f64),
        "disk_free" => Attr::Num(a.disk_free as f64),
        "load" => Attr::Num(f64::from(a.load)),
        _ => return name.strip_prefix("label.").and_then(|k| a.labels.get(k)).map(|v| Attr::Text(v.as_str().into())),
    })
}

/// What the guest needs, and what placement is asked.
#[derive(Clone, Debug, Default)]
pub struct Ask {
    /// Bytes of memory, and vCPUs, per replica.
    pub mem: u64,
    pub vcpus: u32,
    /// The hypervisor kind it runs on (`qemu`, `xen`); none for a test URI.
    pub hv: Option<String>,
    /// The stack's layers, top first, with their bytes.
    pub stack: Vec<(LayerId, u64)>,
    pub replicas: u32,
    /// Spread replicas over the values of this label.
    pub spread: Option<String>,
    /// Fill hosts before others; a host may take several replicas.
    pub pack: bool,
}

/// A host that passed the filters, and how it scored when it was chosen
/// (or, if it was not, for the last replica).
#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    pub node: String,
    pub this_host: bool,
    /// Bytes of the stack it lacks.
    pub missing_bytes: u64,
    #[serde(flatten)]
    pub weights: Weights,
    /// Replicas placed on it.
    pub replicas: u32,
}

/// A host's weights and its score (see the module's table).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Weights {
    pub locality: f64,
    pub capacity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<f64>,
    pub score: f64,
}

/// A host a filter removed, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Removed {
    pub node: String,
    pub filter: &'static str,
    pub why: String,
}

/// A placement: the hosts chosen, one per replica in order, the other
/// hosts that passed (best first) and those removed.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    /// Index into `ranked` of each replica's host.
    pub chosen: Vec<usize>,
    pub ranked: Vec<Scored>,
    /// The first [`MAX_REMOVED`] hosts removed, and why.
    pub removed: Vec<Removed>,
    /// How many hosts each filter removed.
    pub removed_by: BTreeMap<&'static str, usize>,
}

impl Decision {
    /// Hosts that passed the filters but took no replica, best first: the
    /// next candidates when a chosen host fails.
    pub fn spares(&self) -> Vec<&Scored> {
        self.ranked.iter().enumerate().filter(|(i, _)| !self.chosen.contains(i)).map(|(_, s)| s).collect()
    }
}

/// Why nothing could be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("no host is known (is the daemon joined to its peers? see `xenod hosts`)")]
    NoHosts,
    #[error(
        "no host can take it: filter {filter} removed the last {count} candidate(s) ({why}){}",
        others.iter().map(|(f, n)| format!("; {f} removed {n} before")).collect::<String>()
    )]
    Filtered { filter: &'static str, count: usize, why: String, others: Vec<(&'static str, usize)> },
    #[error("{asked} replicas asked, {hosts} host(s) can take one each (use --pack to put several on a host)")]
    TooFew { asked: u32, hosts: usize },
    #[error("--place: {0}")]
    Expr(String),
}

/// Filters `hosts` and places `ask.replicas` replicas on them.
pub fn place(hosts: &[Candidate], ask: &Ask, expr: Option<&Filter>) -> Result<Decision, PlaceError> {
    if hosts.is_empty() {
        return Err(PlaceError::NoHosts);
    }
    let mut removed = Vec::new();
    let mut removed_by: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut first_of: BTreeMap<&'static str, Removed> = BTreeMap::new();
    let mut passed: Vec<&Candidate> = Vec::with_capacity(hosts.len());
    for h in hosts {
        let Some(f) = filter(h, ask, expr)? else {
            passed.push(h);
            continue;
        };
        let n = removed_by.entry(f).or_default();
        *n += 1;
        if removed.len() < MAX_REMOVED || *n == 1 {
            let r = Removed { node: h.node.clone(), filter: f, why: why(h, ask, f) };
            if *n == 1 {
                first_of.insert(f, r.clone());
            }
            if removed.len() < MAX_REMOVED {
                removed.push(r);
            }
        }
    }
    if passed.is_empty() {
        return Err(no_host_left(&removed_by, &first_of));
    }
    let stack_bytes: u64 = ask.stack.iter().map(|(_, b)| b).sum();
    let missing: Vec<u64> =
        passed.iter().map(|h| ask.stack.iter().filter(|(l, _)| !h.holds(l)).map(|(_, b)| b).sum()).collect();
    let mut free: Vec<u64> = passed.iter().map(|h| h.attrs.mem_free).collect();
    let mut placed = vec![0u32; passed.len()];
    // Each host's value of the spread label, as a small number.
    let mut values: BTreeMap<&str, usize> = BTreeMap::new();
    let value_of: Vec<usize> = match &ask.spread {
        Some(k) => passed
            .iter()
            .map(|h| {
                let n = values.len();
                *values.entry(h.attrs.labels.get(k).map_or("", String::as_str)).or_insert(n)
            })
            .collect(),
        None => Vec::new(),
    };
    let mut per_value = vec![0u32; values.len()];
    let mut last: Vec<Option<Weights>> = vec![None; passed.len()];
    let mut chosen = Vec::new();
    for _ in 0..ask.replicas.max(1) {
        let mut best: Option<(usize, f64)> = None;
        for (i, h) in passed.iter().enumerate() {
            if (placed[i] > 0 && !ask.pack) || free[i] < ask.mem {
                continue;
            }
            let locality = if stack_bytes == 0 { 1.0 } else { 1.0 - missing[i] as f64 / stack_bytes as f64 };
            let after = (free[i] - ask.mem) as f64 / h.attrs.mem_total.max(1) as f64;
            let capacity = if ask.pack { 1.0 - after } else { after };
            let spread = ask.spread.as_ref().map(|_| 1.0 / f64::from(1 + per_value[value_of[i]]));
            let score = W_LOCALITY * locality + W_CAPACITY * capacity + W_SPREAD * spread.unwrap_or(0.0);
            last[i] = Some(Weights { locality, capacity, spread, score });
            // Ties: the node id that sorts first.
            let better = match best {
                None => true,
                Some((j, s)) => score > s || (score == s && h.node < passed[j].node),
            };
            if better {
                best = Some((i, score));
            }
        }
        let Some((i, _)) = best else {
            let hosts = placed.iter().filter(|&&n| n > 0).count();
            return Err(PlaceError::TooFew { asked: ask.replicas, hosts });
        };
        placed[i] += 1;
        free[i] -= ask.mem;
        if ask.spread.is_some() {
            per_value[value_of[i]] += 1;
        }
        chosen.push(i);
    }
    // The report keeps the chosen hosts and the best others, at most
    // MAX_RANKED in all: the next candidates, and why they lost.
    let mut order: Vec<usize> = (0..passed.len()).filter(|i| placed[*i] == 0).collect();
    let score = |i: usize| last[i].map_or(f64::NEG_INFINITY, |w| w.score);
    let by_score =
        |a: &usize, b: &usize| score(*b).total_cmp(&score(*a)).then_with(|| passed[*a].node.cmp(&passed[*b].node));
    let keep = MAX_RANKED.saturating_sub(chosen.len()).min(order.len());
    if keep > 0 && keep < order.len() {
        order.select_nth_unstable_by(keep - 1, by_score);
    }
    order.truncate(keep);
    let mut seen = vec![false; passed.len()];
    let kept: Vec<usize> =
        chosen.iter().copied().chain(order).filter(|&i| !std::mem::replace(&mut seen[i], true)).collect();
    let mut ranked: Vec<(usize, Scored)> = kept
        .into_iter()
        .map(|i| (i, passed[i]))
        .map(|(i, h)| {
            let weights =
                last[i].unwrap_or(Weights { locality: 0.0, capacity: 0.0, spread: None, score: f64::NEG_INFINITY });
            let s = Scored {
                node: h.node.clone(),
                this_host: h.this_host,
                missing_bytes: missing[i],
                weights,
                replicas: placed[i],
            };
            (i, s)
        })
        .collect();
    // Chosen hosts first, in replica order; then the rest by score.
    let order = |i: usize| chosen.iter().position(|&c| c == i);
    ranked.sort_by(|(i, a), (j, b)| match (order(*i), order(*j)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.weights.score.total_cmp(&a.weights.score).then_with(|| a.node.cmp(&b.node)),
    });
    let chosen_idx = chosen.iter().map(|c| ranked.iter().position(|(i, _)| i == c).unwrap_or(0)).collect();
    Ok(Decision { chosen: chosen_idx, ranked: ranked.into_iter().map(|(_, s)| s).collect(), removed, removed_by })
}

/// The first filter that removes `h`; `None` if it passes.
fn filter(h: &Candidate, ask: &Ask, expr: Option<&Filter>) -> Result<Option<&'static str>, PlaceError> {
    if let Some(f) = expr
        && !f.matches_with(&|n| h.attr(n)).map_err(PlaceError::Expr)?
    {
        return Ok(Some("expr"));
    }
    Ok(if ask.hv.as_ref().is_some_and(|hv| !h.attrs.hv.contains(hv)) {
        Some("hypervisor")
    } else if h.attrs.vcpus < ask.vcpus {
        Some("vcpus")
    } else if h.attrs.mem_free < ask.mem {
        Some("memory")
    } else {
        None
    })
}

/// Why `filter` removed `h`.
fn why(h: &Candidate, ask: &Ask, filter: &str) -> String {
    match filter {
        "expr" => "does not match --place".into(),
        "hypervisor" => {
            let has = if h.attrs.hv.is_empty() { "none".into() } else { h.attrs.hv.join(",") };
            format!("runs {has}, not {}", ask.hv.as_deref().unwrap_or(""))
        }
        "vcpus" => format!("{} vCPUs, {} asked", h.attrs.vcpus, ask.vcpus),
        _ => format!("{} MiB free, {} MiB asked", h.attrs.mem_free >> 20, ask.mem >> 20),
    }
}

/// The error when every host was removed: the filter that removed the
/// last of them (the latest in filter order that removed any), with the
/// reason it gave the first of those, and how many each earlier one took.
fn no_host_left(by: &BTreeMap<&'static str, usize>, first_of: &BTreeMap<&'static str, Removed>) -> PlaceError {
    const ORDER: [&str; 4] = ["expr", "hypervisor", "vcpus", "memory"];
    let count = |f: &str| by.get(f).copied().unwrap_or(0);
    let last = ORDER.iter().rev().copied().find(|f| count(f) > 0).unwrap_or("expr");
    let why = first_of.get(last).map(|r| format!("{}: {}", short(&r.node), r.why)).unwrap_or_default();
    let others = ORDER.iter().copied().filter(|f| *f != last && count(f) > 0).map(|f| (f, count(f))).collect();
    PlaceError::Filtered { filter: last, count: count(last), why, others }
}

/// A node id's first 10 characters, for messages.
pub fn short(node: &str) -> &str {
    node.get(..10).unwrap_or(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter;

    fn layer(i: u8) -> LayerId {
        LayerId::from_bytes([i; 32])
    }

    fn host(node: &str, zone: &str, mem_free_gib: u64, layers: &[u8]) -> Candidate {
        let attrs = HostAttrs {
            hv: vec!["qemu".into(), "tcg".into()],
            vcpus: 4,
            mem_total: 16 << 30,
            mem_free: mem_free_gib << 30,
            disk_free: 100 << 30,
            load: 0.5,
            labels: [("zone".to_string(), zone.to_string())].into(),
        };
        Candidate::new(node.into(), attrs, layers.iter().map(|&i| layer(i)).collect(), false)
    }

    fn ask(replicas: u32) -> Ask {
        Ask {
            mem: 1 << 30,
            vcpus: 1,
            hv: Some("qemu".into()),
            stack: vec![(layer(2), 35 << 20), (layer(1), 160 << 20)],
            replicas,
            ..Ask::default()
        }
    }

    fn nodes(d: &Decision) -> Vec<&str> {
        d.chosen.iter().map(|&i| d.ranked[i].node.as_str()).collect()
    }

    #[test]
    fn the_host_holding_the_stack_wins_over_free_memory() {
        let hosts = [host("a", "z1", 15, &[]), host("b", "z1", 2, &[1, 2]), host("c", "z2", 15, &[1])];
        let d = place(&hosts, &ask(1), None).unwrap();
        assert_eq!(nodes(&d), ["b"]);
        assert_eq!(d.ranked[0].missing_bytes, 0);
        // Then the one holding the template: it lacks only the overlay.
        assert_eq!(d.ranked[1].node, "c");
        assert_eq!(d.ranked[1].missing_bytes, 35 << 20);
        assert_eq!(d.spares().len(), 2);
        // With equal locality, the freer host.
        let hosts = [host("a", "z1", 3, &[]), host("b", "z1", 9, &[])];
        assert_eq!(nodes(&place(&hosts, &ask(1), None).unwrap()), ["b"]);
        // --pack: the fuller one, and it takes replicas while memory lasts.
        let mut a = ask(3);
        a.pack = true;
        let d = place(&hosts, &a, None).unwrap();
        assert_eq!(nodes(&d), ["a", "a", "a"]);
    }

    #[test]
    fn spread_puts_replicas_in_distinct_zones_then_by_locality() {
        let hosts = [
            host("a1", "a", 8, &[1, 2]),
            host("a2", "a", 8, &[1]),
            host("b1", "b", 8, &[]),
            host("b2", "b", 8, &[1]),
            host("c1", "c", 8, &[]),
        ];
        let mut a = ask(3);
        a.spread = Some("zone".into());
        let d = place(&hosts, &a, None).unwrap();
        assert_eq!(nodes(&d), ["a1", "b2", "c1"]);
        // A host holding the whole stack in a used zone loses to an empty
        // one in an unused zone.
        let hosts2 = [host("a1", "a", 8, &[1, 2]), host("a2", "a", 8, &[1, 2]), host("b1", "b", 8, &[])];
        let mut two = a.clone();
        two.replicas = 2;
        assert_eq!(nodes(&place(&hosts2, &two, None).unwrap()), ["a1", "b1"]);
        // Without spread: the three with the most of the stack.
        let d = place(&hosts, &ask(3), None).unwrap();
        assert_eq!(nodes(&d), ["a1", "a2", "b2"]);
        // More replicas than hosts, without --pack.
        let e = place(&hosts[..2], &ask(3), None).unwrap_err();
        assert!(e.to_string().contains("3 replicas asked, 2 host(s)"), "{e}");
    }

    #[test]
    fn filters_remove_hosts_and_say_which_removed_the_last() {
        let mut small = host("small", "a", 0, &[]);
        small.attrs.mem_free = 512 << 20;
        let mut xen = host("xenhost", "a", 8, &[]);
        xen.attrs.hv = vec!["xen".into()];
        let hosts = [small, xen, host("eu", "b", 8, &[])];
        let f = filter::parse("label.zone=a").unwrap();
        let e = place(&hosts, &ask(1), Some(&f)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("filter memory removed the last 1") && msg.contains("512 MiB free"), "{msg}");
        assert!(msg.contains("expr removed 1") && msg.contains("hypervisor removed 1"), "{msg}");
        let d = place(&hosts, &ask(1), None).unwrap();
        assert_eq!(nodes(&d), ["eu"]);
        let why: Vec<(&str, &str)> = d.removed.iter().map(|r| (r.node.as_str(), r.filter)).collect();
        assert_eq!(why, [("small", "memory"), ("xenhost", "hypervisor")]);
        assert!(matches!(place(&[], &ask(1), None), Err(PlaceError::NoHosts)));
        // A comparison the attribute cannot take is an error, not a filter.
        let f = filter::parse("label.zone>3").unwrap();
        assert!(matches!(place(&hosts, &ask(1), Some(&f)), Err(PlaceError::Expr(_))));
    }

    #[test]
    fn a_decision_is_the_same_whatever_the_order_of_hosts() {
        let mut hosts: Vec<Candidate> = (0..50).map(|i| host(&format!("n{i:02}"), "a", 8, &[])).collect();
        let d1 = place(&hosts, &ask(3), None).unwrap();
        hosts.reverse();
        let d2 = place(&hosts, &ask(3), None).unwrap();
        assert_eq!(nodes(&d1), nodes(&d2));
        assert_eq!(nodes(&d1), ["n00", "n01", "n02"]);
    }
}
