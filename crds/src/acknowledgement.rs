//! How a data-plane replica tells the operator which snapshot it has applied: one
//! `coordination.k8s.io/v1` Lease per replica, in the snapshot Secret's namespace.
//!
//! ```text
//!   data plane replica ──SSA──▶ Lease portcullis-dp-<replica>      labels: component=dataplane-ack
//!                                 spec.holderIdentity  = <replica>
//!                                 spec.renewTime       = last apply or heartbeat
//!                                 annotations: snapshot-generation, snapshot-digest
//!   operator ──watch (label selector)──▶ counts live replicas at generation ≥ G ──▶ status `Enforced`
//! ```
//!
//! A Lease, not a status field on something shared: each replica writes only its own small object,
//! the operator reads them with one label-selected watch, and a replica that vanishes without
//! saying goodbye stops counting once its Lease runs out.

/// Prefix of every replica's Lease name.
pub const LEASE_PREFIX: &str = "portcullis-dp-";
/// Label key marking acknowledgement Leases.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label value marking acknowledgement Leases.
pub const COMPONENT: &str = "dataplane-ack";
/// The label selector the operator watches with.
pub const LABEL_SELECTOR: &str = "app.kubernetes.io/component=dataplane-ack";
/// Annotation: the generation of the snapshot the replica serves (decimal).
pub const GENERATION_ANNOTATION: &str = "portcullis.dev/snapshot-generation";
/// Annotation: that snapshot's content digest (hex SHA-256).
pub const DIGEST_ANNOTATION: &str = "portcullis.dev/snapshot-digest";
/// Field manager of the replicas' server-side applies.
pub const FIELD_MANAGER: &str = "portcullis-dataplane";

/// Kubernetes object names are at most 253 characters.
const MAX_NAME: usize = 253;

/// The Lease name for `replica` (a pod name): lower-cased, characters a name cannot hold turned
/// into `-`, and cut to the length limit.
pub fn lease_name(replica: &str) -> String {
    let mut name = String::with_capacity(LEASE_PREFIX.len() + replica.len());
    name.push_str(LEASE_PREFIX);
    for c in replica.chars() {
        if name.len() >= MAX_NAME {
            break;
        }
        let c = c.to_ascii_lowercase();
        name.push(if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' });
    }
    while name.ends_with(['-', '.']) {
        name.pop();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(lease_name("portcullis-dataplane-7d9f-abcde"), "portcullis-dp-portcullis-dataplane-7d9f-abcde");
        assert_eq!(lease_name("My_Host"), "portcullis-dp-my-host");
        assert_eq!(lease_name("x_"), "portcullis-dp-x");
        assert_eq!(lease_name(&"a".repeat(400)).len(), MAX_NAME);
    }
}
