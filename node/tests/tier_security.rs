//! What a region's site accepts of a job its hub derived (`roles::tier`), with real kits from
//! `poc prepare --regions 2`: the hub's signed record over the unchanged original is taken; a
//! forged hub flag, a tampered app, a record without the hub's signature, one signed by
//! another region's hub or by a site, and one for another job or original are refused.
//!
//! Nested regions, with kits of a provisioned three-tier project (hubs `eu`, `us`, `eu.de`,
//! `eu.fr`): a site of `eu.de` takes a tier-1 job only with eu's step and eu.de's linked below
//! it, each signed by the hub of its region; a missing, extra, foreign, unlinked or unpassed
//! step is refused, and a region admin's job needs only the hubs below that region. Records
//! from before nesting decode, and are the whole chain only directly below the submitter.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use flare_node::jobpack;
use flare_node::net::protocol::JobBundle;
use flare_node::roles::tier::{self, Derivation, DerivationError, DerivedChanges};
use flare_provision::kit::{Kit, load_kit};
use flare_provision::poc::{PocOptions, prepare_tiered_now};

struct Kits {
    _dir: tempfile::TempDir,
    prod: PathBuf,
}

impl Kits {
    fn new() -> Kits {
        let dir = tempfile::tempdir().unwrap();
        let opts = PocOptions {
            workspace: dir.path().join("poc"),
            clients: 2,
            base_port: Some(25_000),
        };
        let out = prepare_tiered_now(&opts, 2).unwrap();
        let prod = out.project_file.parent().unwrap().join("prod_00");
        let prod = if prod.is_dir() {
            prod
        } else {
            std::fs::read_dir(dir.path().join("poc"))
                .unwrap()
                .flatten()
                .map(|e| e.path().join("prod_00"))
                .find(|p| p.is_dir())
                .unwrap()
        };
        Kits { _dir: dir, prod }
    }

    fn kit(&self, rel: &str) -> Kit {
        load_kit(&self.prod.join(rel).join("startup"), SystemTime::now()).unwrap()
    }
}

fn job_dir(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hub-mnist");
    let job = dir.join("job");
    std::fs::create_dir_all(job.join("app/config")).unwrap();
    for f in [
        "meta.json",
        "app/config/config_fed_server.json",
        "app/config/config_fed_client.json",
    ] {
        std::fs::copy(src.join(f), job.join(f)).unwrap();
    }
    job
}

fn record(hub: &Kit, job: &str, bundle: &JobBundle) -> Derivation {
    record_with(hub, job, bundle, &["@ALL"])
}

/// The record `hub` makes for `job`, its region's deploy map naming `names`.
fn record_with(hub: &Kit, job: &str, bundle: &JobBundle, names: &[&str]) -> Derivation {
    Derivation {
        job_id: job.into(),
        hub: hub.name().into(),
        region: hub.cert.region.clone().unwrap(),
        submitter: "admin@nvidia.com".into(),
        original_signature_sha256: tier::original_hash(bundle),
        parent_record_sha256: None,
        changes: DerivedChanges {
            deploy_map: [(
                "app".to_string(),
                names.iter().map(|n| n.to_string()).collect(),
            )]
            .into(),
            min_clients: 2,
            num_rounds: None,
        },
    }
}

/// A top step signed by `hub` with its own key and certificate.
fn top(hub: &Kit, record: &Derivation) -> tier::SignedDerivation {
    tier::sign(record, &hub.identity.signing, &hub.cert.der).unwrap()
}

/// The step `hub` signs below `parent`.
fn below(parent: &tier::SignedDerivation, hub: &Kit, record: Derivation) -> tier::SignedDerivation {
    tier::sign_below(parent, record, &hub.identity.signing, &hub.cert.der).unwrap()
}

/// What the node of `kit` (a site, or a hub's upward endpoint living in `region`) makes of a
/// deploy of `job` by `submitter` with `derivation`.
fn check_at(
    kit: &Kit,
    region: Option<&str>,
    submitter: &Kit,
    derivation: Option<&tier::SignedDerivation>,
    job: &str,
    bundle: &JobBundle,
) -> Result<Option<Derivation>, DerivationError> {
    tier::check_deploy(
        &tier::DeployCheck {
            root: &kit.root_ca,
            region,
            server: &kit.config.server.name,
            submitter: &submitter.cert,
            job_id: job,
            bundle,
            now: SystemTime::now(),
        },
        derivation,
    )
}

/// A site's check of a derived job that `admin` submitted at tier 1.
fn check(
    site: &Kit,
    admin: &Kit,
    signed: &tier::SignedDerivation,
    job: &str,
    bundle: &JobBundle,
) -> Result<Derivation, DerivationError> {
    check_at(
        site,
        site.config.region.as_deref(),
        admin,
        Some(signed),
        job,
        bundle,
    )
    .map(|d| d.unwrap())
}

#[test]
fn a_site_takes_only_what_its_own_hub_signed_over_the_unchanged_original() {
    let kits = Kits::new();
    let tmp = tempfile::tempdir().unwrap();
    let admin = kits.kit("admin@nvidia.com");
    let hub = kits.kit("region-1/region-1");
    let other_hub = kits.kit("region-2/region-2");
    let site = kits.kit("region-1/site-1");
    let bundle = jobpack::pack(&job_dir(tmp.path()), &admin.identity.signing).unwrap();
    let id = "0123456789ab-cdef";

    // The hub's record over the original: taken, and the submitter's signature holds.
    let good = tier::sign(
        &record(&hub, id, &bundle),
        &hub.identity.signing,
        &hub.cert.der,
    )
    .unwrap();
    let d = check(&site, &admin, &good, id, &bundle).unwrap();
    assert_eq!(d.region, "region-1");
    let dest = tmp.path().join("unpacked");
    jobpack::unpack_verified(&bundle, &dest, &admin.cert.signing_public).unwrap();
    tier::refuse_flags(&dest).unwrap();

    // A tampered app: the submitter's signature no longer holds.
    let mut tampered = bundle.clone();
    let key = tampered
        .files
        .keys()
        .find(|k| k.ends_with("config_fed_client.json"))
        .unwrap()
        .clone();
    let mut bytes = tampered.files[&key].to_vec();
    bytes.extend_from_slice(b" ");
    tampered
        .files
        .insert(key, serde_bytes::ByteBuf::from(bytes));
    let e = jobpack::unpack_verified(&tampered, &tmp.path().join("t"), &admin.cert.signing_public);
    assert!(e.is_err(), "a tampered app was taken");

    // A record whose original is another one (the hub re-signed a changed job).
    let mut other = bundle.clone();
    other.signature = serde_bytes::ByteBuf::from(b"{}".to_vec());
    assert!(matches!(
        check(&site, &admin, &good, id, &other),
        Err(DerivationError::Mismatch(_))
    ));
    // For another job.
    assert!(matches!(
        check(&site, &admin, &good, "0123456789ab-0000", &bundle),
        Err(DerivationError::Mismatch(_))
    ));

    // No hub signature: the record with a signature of zeros, or signed by another key.
    let mut unsigned = good.clone();
    unsigned.signature = vec![0; 64];
    assert!(matches!(
        check(&site, &admin, &unsigned, id, &bundle),
        Err(DerivationError::Signature(_))
    ));
    let by_site = tier::sign(
        &record(&hub, id, &bundle),
        &site.identity.signing,
        &hub.cert.der,
    )
    .unwrap();
    assert!(matches!(
        check(&site, &admin, &by_site, id, &bundle),
        Err(DerivationError::Signature(_))
    ));

    // Another region's hub, with its own certificate and key: not this site's hub.
    let foreign = tier::sign(
        &record(&other_hub, id, &bundle),
        &other_hub.identity.signing,
        &other_hub.cert.der,
    )
    .unwrap();
    let e = check(&site, &admin, &foreign, id, &bundle).unwrap_err();
    assert!(matches!(e, DerivationError::Hub(_)), "{e}");
    assert!(e.to_string().contains("region-2"), "{e}");
    // A site's certificate presented as the hub's.
    let as_site = tier::sign(
        &record(&hub, id, &bundle),
        &site.identity.signing,
        &site.cert.der,
    )
    .unwrap();
    assert!(matches!(
        check(&site, &admin, &as_site, id, &bundle),
        Err(DerivationError::Hub(_))
    ));
}

#[test]
fn a_hub_flag_in_meta_alone_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let job = job_dir(tmp.path());
    let meta = job.join("meta.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    v["from_hub_site"] = serde_json::json!("region-1");
    std::fs::write(&meta, v.to_string()).unwrap();
    let e = tier::refuse_flags(&job).unwrap_err();
    assert!(
        matches!(e, DerivationError::FlagWithoutRecord(ref f) if f == "from_hub_site"),
        "{e}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever bytes a derivation carries, a site's check answers with an error, never a
    /// panic: random records (signed by the real hub, so parsing is reached), random
    /// certificates and random signatures.
    #[test]
    fn random_bytes_in_a_derivation_never_panic_the_check(
        record in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        cert in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
    ) {
        let kits = KITS.get_or_init(Kits::new);
        let admin = kits.kit("admin@nvidia.com");
        let hub = kits.kit("region-1/region-1");
        let site = kits.kit("region-1/site-1");
        let bundle = JobBundle { files: Default::default(), signature: serde_bytes::ByteBuf::from(b"sig".to_vec()) };
        let msg = [b"flare/hub-derivation/v1\0".as_slice(), &record].concat();
        let signed_by_hub = tier::SignedDerivation {
            record: record.clone(),
            signature: hub.identity.signing.sign(&msg).unwrap().to_vec(),
            hub_cert: hub.cert.der.clone(),
            parents: Vec::new(),
        };
        proptest::prop_assert!(check(&site, &admin, &signed_by_hub, "0123456789ab-cdef", &bundle).is_err());
        let garbage = tier::SignedDerivation { record: record.clone(), signature: signature.clone(), hub_cert: cert.clone(), parents: Vec::new() };
        proptest::prop_assert!(check(&site, &admin, &garbage, "0123456789ab-cdef", &bundle).is_err());

        // In a nested region: a random parent step (signed by the real parent hub, so its
        // record is parsed) above a real step of the leaf's hub that names it as its parent.
        let nested = NESTED.get_or_init(NestedKits::new);
        let (eu, de, leaf) = (nested.kit("eu/eu"), nested.kit("eu.de/eu.de"), nested.kit("eu.de/site-1"));
        let admin = nested.kit("admin@nvidia.com");
        let parent = tier::SignedDerivation {
            record: record.clone(),
            signature: eu.identity.signing.sign(&msg).unwrap().to_vec(),
            hub_cert: eu.cert.der.clone(),
            parents: Vec::new(),
        };
        let chain = below(&parent, &de, record_with(&de, "0123456789ab-cdef", &bundle, &["@ALL"]));
        proptest::prop_assert!(check(&leaf, &admin, &chain, "0123456789ab-cdef", &bundle).is_err());
        let garbage_parent = tier::DerivationStep { record: record.clone(), signature, hub_cert: cert };
        let mut chain = chain;
        chain.parents = vec![garbage_parent];
        proptest::prop_assert!(check(&leaf, &admin, &chain, "0123456789ab-cdef", &bundle).is_err());
        // Random bytes as a deploy's derivation on the wire decode to an error or a value,
        // never a panic.
        let _ = flare_protocols::codec::decode::<tier::SignedDerivation>(&record, 1 << 20);
    }
}

/// A nested project's kits for every property case.
static NESTED: std::sync::OnceLock<NestedKits> = std::sync::OnceLock::new();

/// A three-tier project: hubs `eu`, `us` below tier 1, `eu.de` and `eu.fr` below `eu`; a site
/// and an admin in `eu`, a site in `eu.de`, an admin in `us`.
struct NestedKits {
    _dir: tempfile::TempDir,
    prod: PathBuf,
}

impl NestedKits {
    fn new() -> NestedKits {
        let dir = tempfile::tempdir().unwrap();
        let mut yml = String::from(
            "api_version: 3\nname: nested\ndescription: three tiers\nparticipants:\n  \
             - name: server\n    type: server\n    org: nvidia\n    fed_learn_port: 25100\n    \
             admin_port: 25101\n  \
             - name: admin@nvidia.com\n    type: admin\n    org: nvidia\n    role: project_admin\n",
        );
        for (i, hub) in ["eu", "us", "eu.de", "eu.fr"].iter().enumerate() {
            yml.push_str(&format!(
                "  - name: {hub}\n    type: hub\n    org: nvidia\n    fed_learn_port: {}\n",
                25_102 + i
            ));
        }
        for region in ["eu", "eu.de"] {
            yml.push_str(&format!(
                "  - name: site-1\n    type: client\n    org: nvidia\n    region: {region}\n"
            ));
        }
        for region in ["eu", "us"] {
            yml.push_str(&format!(
                "  - name: admin@{region}\n    type: admin\n    org: nvidia\n    role: project_admin\n    region: {region}\n"
            ));
        }
        yml.push_str("builders: [workspace, static_files, certs, signature]\n");
        let project = flare_provision::project::Project::parse(&yml).unwrap();
        let out =
            flare_provision::builder::provision_now(&project, &dir.path().join("ws")).unwrap();
        NestedKits {
            _dir: dir,
            prod: out.prod_dir,
        }
    }

    fn kit(&self, rel: &str) -> Kit {
        load_kit(&self.prod.join(rel).join("startup"), SystemTime::now()).unwrap()
    }
}

/// `e` is a [`DerivationError::Chain`] whose message says `what`.
fn chain_error(e: DerivationError, what: &str) {
    assert!(
        matches!(e, DerivationError::Chain(_)),
        "not a chain error: {e}"
    );
    assert!(e.to_string().contains(what), "{e:?} does not say {what:?}");
}

#[test]
fn a_nested_site_takes_a_job_only_with_every_hub_s_step_from_the_top() {
    let k = NestedKits::new();
    let tmp = tempfile::tempdir().unwrap();
    let admin = k.kit("admin@nvidia.com");
    let (eu, us, de, fr) = (
        k.kit("eu/eu"),
        k.kit("us/us"),
        k.kit("eu.de/eu.de"),
        k.kit("eu.fr/eu.fr"),
    );
    let (leaf, eu_site) = (k.kit("eu.de/site-1"), k.kit("eu/site-1"));
    assert_eq!(leaf.config.region.as_deref(), Some("eu.de"));
    assert_eq!(leaf.config.server.name, "eu.de");
    let bundle = jobpack::pack(&job_dir(tmp.path()), &admin.identity.signing).unwrap();
    let id = "0123456789ab-cdef";
    let at_leaf =
        |d: Option<&tier::SignedDerivation>| check_at(&leaf, Some("eu.de"), &admin, d, id, &bundle);

    // The proper chain: eu's step, then eu.de's below it, linked to it.
    let eu_step = top(&eu, &record(&eu, id, &bundle));
    let chain = below(&eu_step, &de, record_with(&de, id, &bundle, &["site-1"]));
    assert_eq!(chain.parents, vec![eu_step.step()]);
    let d = at_leaf(Some(&chain)).unwrap().unwrap();
    assert_eq!((d.hub.as_str(), d.region.as_str()), ("eu.de", "eu.de"));
    assert_eq!(
        d.parent_record_sha256,
        Some(tier::record_hash(&eu_step.record))
    );
    assert_eq!(d.changes.deploy_map["app"], vec!["site-1"]);
    // It travels as one value.
    let wire = flare_protocols::codec::encode(&chain, 1 << 20).unwrap();
    let back: tier::SignedDerivation = flare_protocols::codec::decode(&wire, 1 << 20).unwrap();
    assert_eq!(back, chain);
    // eu.de's upward endpoint lives in eu and is served by eu: eu's step alone is its chain.
    assert!(
        check_at(&de, Some("eu"), &admin, Some(&eu_step), id, &bundle)
            .unwrap()
            .is_some()
    );

    // A missing parent step: eu.de's record alone, or nothing at all.
    let alone = top(&de, &record(&de, id, &bundle));
    chain_error(at_leaf(Some(&alone)).unwrap_err(), "eu, eu.de");
    chain_error(
        at_leaf(None).unwrap_err(),
        "without their derivation records",
    );

    // The parent step signed by another region's hub: us in eu's place (its own record), or
    // eu.de claiming to be eu (its certificate is scoped to eu.de).
    let by_us = below(
        &top(&us, &record(&us, id, &bundle)),
        &de,
        record(&de, id, &bundle),
    );
    let e = at_leaf(Some(&by_us)).unwrap_err();
    assert!(matches!(e, DerivationError::Hub(_)), "{e}");
    assert!(
        e.to_string()
            .contains("us is the hub of region us, not of region eu"),
        "{e}"
    );
    let mut as_eu = record(&de, id, &bundle);
    as_eu.hub = "eu".into();
    as_eu.region = "eu".into();
    let forged = below(&top(&de, &as_eu), &de, record(&de, id, &bundle));
    let e = at_leaf(Some(&forged)).unwrap_err();
    assert!(matches!(e, DerivationError::Hub(_)), "{e}");
    // The last step signed by the hub of a sibling region below eu's real step.
    let sibling = below(&eu_step, &fr, record(&fr, id, &bundle));
    let e = at_leaf(Some(&sibling)).unwrap_err();
    assert!(matches!(e, DerivationError::Hub(_)), "{e}");
    assert!(e.to_string().contains("eu.fr"), "{e}");

    // Real steps of eu and eu.de, not linked: eu.de's record names no parent, or another
    // record of eu's than the one carried.
    let mut unlinked = top(&de, &record(&de, id, &bundle));
    unlinked.parents = vec![eu_step.step()];
    chain_error(
        at_leaf(Some(&unlinked)).unwrap_err(),
        "does not name the step of region eu",
    );
    let eu_again = top(&eu, &record_with(&eu, id, &bundle, &["@ALL", "site-1"]));
    let mut swapped = chain.clone();
    swapped.parents = vec![eu_again.step()];
    chain_error(
        at_leaf(Some(&swapped)).unwrap_err(),
        "does not name the step of region eu",
    );
    // eu's top step naming a parent it cannot have.
    let mut rooted = record(&eu, id, &bundle);
    rooted.parent_record_sha256 = Some(tier::record_hash(b"{}"));
    let rooted = below(&top(&eu, &rooted), &de, record(&de, id, &bundle));
    chain_error(at_leaf(Some(&rooted)).unwrap_err(), "it is the top one");

    // eu did not pass the job on to eu.de: its deploy map names its own site only.
    let eu_own = top(&eu, &record_with(&eu, id, &bundle, &["site-1"]));
    let not_passed = below(&eu_own, &de, record(&de, id, &bundle));
    chain_error(
        at_leaf(Some(&not_passed)).unwrap_err(),
        "did not pass the job on to eu.de",
    );
    let eu_named = top(&eu, &record_with(&eu, id, &bundle, &["site-1", "eu.de"]));
    assert!(at_leaf(Some(&below(&eu_named, &de, record(&de, id, &bundle)))).is_ok());

    // Every step is checked, not only the leaf's hub's: eu's signature, job, original and
    // submitter.
    let mut bad = chain.clone();
    bad.parents[0].signature = vec![0; 64];
    let e = at_leaf(Some(&bad)).unwrap_err();
    assert!(matches!(e, DerivationError::Signature(_)), "{e}");
    assert!(e.to_string().contains("region eu:"), "{e}");
    let other_job = top(&eu, &record(&eu, "0123456789ab-0000", &bundle));
    let e = at_leaf(Some(&below(&other_job, &de, record(&de, id, &bundle)))).unwrap_err();
    assert!(matches!(e, DerivationError::Mismatch(_)), "{e}");
    let mut other_original = record(&eu, id, &bundle);
    other_original.original_signature_sha256 = tier::record_hash(b"another job");
    let e = at_leaf(Some(&below(
        &top(&eu, &other_original),
        &de,
        record(&de, id, &bundle),
    )))
    .unwrap_err();
    assert!(matches!(e, DerivationError::Mismatch(_)), "{e}");
    let mut other_submitter = record(&eu, id, &bundle);
    other_submitter.submitter = "admin@eu".into();
    let e = at_leaf(Some(&below(
        &top(&eu, &other_submitter),
        &de,
        record(&de, id, &bundle),
    )))
    .unwrap_err();
    assert!(matches!(e, DerivationError::Mismatch(_)), "{e}");

    // A site of eu takes eu's step alone and refuses the chain of eu.de (a step too many); a
    // site whose server is not the last step's hub refuses it.
    assert!(check_at(&eu_site, Some("eu"), &admin, Some(&eu_step), id, &bundle).is_ok());
    chain_error(
        check_at(&eu_site, Some("eu"), &admin, Some(&chain), id, &bundle).unwrap_err(),
        "it has 2 step(s)",
    );
    let e = tier::check_deploy(
        &tier::DeployCheck {
            root: &leaf.root_ca,
            region: Some("eu.de"),
            server: "eu",
            submitter: &admin.cert,
            job_id: id,
            bundle: &bundle,
            now: SystemTime::now(),
        },
        Some(&chain),
    )
    .unwrap_err();
    assert!(matches!(e, DerivationError::Hub(_)), "{e}");
}

#[test]
fn a_region_admin_s_job_needs_the_hubs_below_that_region_only() {
    let k = NestedKits::new();
    let tmp = tempfile::tempdir().unwrap();
    let (eu_admin, us_admin) = (k.kit("eu/admin@eu"), k.kit("us/admin@us"));
    let (eu, de) = (k.kit("eu/eu"), k.kit("eu.de/eu.de"));
    let (leaf, eu_site) = (k.kit("eu.de/site-1"), k.kit("eu/site-1"));
    let bundle = jobpack::pack(&job_dir(tmp.path()), &eu_admin.identity.signing).unwrap();
    let id = "0123456789ab-cdef";
    let by_eu_admin = |hub: &Kit| {
        let mut r = record(hub, id, &bundle);
        r.submitter = "admin@eu".into();
        r
    };

    // Submitted at eu's server: eu.de's hub derives it for its region, a top step.
    let own = top(&de, &by_eu_admin(&de));
    let d = check_at(&leaf, Some("eu.de"), &eu_admin, Some(&own), id, &bundle).unwrap();
    assert_eq!(d.unwrap().region, "eu.de");
    // eu's step above it would claim that the job came from tier 1: one step too many.
    let mut from_eu = top(&eu, &by_eu_admin(&eu));
    from_eu = below(&from_eu, &de, by_eu_admin(&de));
    chain_error(
        check_at(&leaf, Some("eu.de"), &eu_admin, Some(&from_eu), id, &bundle).unwrap_err(),
        "needs one by each hub of eu.de",
    );
    // At eu's own site (and at eu.de's upward endpoint) it is an ordinary job of region eu:
    // no derivation, and none may come with it.
    assert!(
        check_at(&eu_site, Some("eu"), &eu_admin, None, id, &bundle)
            .unwrap()
            .is_none()
    );
    assert!(
        check_at(&de, Some("eu"), &eu_admin, None, id, &bundle)
            .unwrap()
            .is_none()
    );
    let eu_step = top(&eu, &by_eu_admin(&eu));
    chain_error(
        check_at(&eu_site, Some("eu"), &eu_admin, Some(&eu_step), id, &bundle).unwrap_err(),
        "job of this node's own region",
    );
    // An admin of us reaches no site of eu.
    chain_error(
        check_at(&leaf, Some("eu.de"), &us_admin, Some(&own), id, &bundle).unwrap_err(),
        "neither this node's region eu.de nor above it",
    );
    chain_error(
        check_at(&eu_site, Some("eu"), &us_admin, None, id, &bundle).unwrap_err(),
        "neither",
    );
}

#[test]
fn records_from_before_nesting_still_decode_and_long_chains_do_not() {
    /// A derivation as a node from before nesting sends it: no `parents`.
    #[derive(serde::Serialize)]
    struct OldSignedDerivation {
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        hub_cert: Vec<u8>,
    }
    let k = NestedKits::new();
    let tmp = tempfile::tempdir().unwrap();
    let admin = k.kit("admin@nvidia.com");
    let (eu, de) = (k.kit("eu/eu"), k.kit("eu.de/eu.de"));
    let (leaf, eu_site) = (k.kit("eu.de/site-1"), k.kit("eu/site-1"));
    let bundle = jobpack::pack(&job_dir(tmp.path()), &admin.identity.signing).unwrap();
    let id = "0123456789ab-cdef";
    let cap = 1 << 20;
    let old = |s: &tier::SignedDerivation| {
        let old = OldSignedDerivation {
            record: s.record.clone(),
            signature: s.signature.clone(),
            hub_cert: s.hub_cert.clone(),
        };
        let bytes = flare_protocols::codec::encode(&old, cap).unwrap();
        flare_protocols::codec::decode::<tier::SignedDerivation>(&bytes, cap).unwrap()
    };
    // A top step of an old hub: the whole chain of a site of eu, as before.
    let eu_step = old(&top(&eu, &record(&eu, id, &bundle)));
    assert!(eu_step.parents.is_empty());
    assert!(check_at(&eu_site, Some("eu"), &admin, Some(&eu_step), id, &bundle).is_ok());
    // And a top step serializes as it did: an old node reads the new one alike.
    let new = flare_protocols::codec::encode(&top(&eu, &record(&eu, id, &bundle)), cap).unwrap();
    assert!(!String::from_utf8_lossy(&new).contains("parents"));
    // An old nested hub's single step: refused at its site, the parent step missing.
    let de_old = old(&top(&de, &record(&de, id, &bundle)));
    chain_error(
        check_at(&leaf, Some("eu.de"), &admin, Some(&de_old), id, &bundle).unwrap_err(),
        "it has 1 step(s)",
    );
    // A chain longer than any region is refused as it is decoded.
    let mut long = below(&eu_step, &de, record(&de, id, &bundle));
    long.parents = vec![eu_step.step(); tier::MAX_CHAIN_STEPS + 1];
    let bytes = flare_protocols::codec::encode(&long, cap).unwrap();
    let e = flare_protocols::codec::decode::<tier::SignedDerivation>(&bytes, cap).unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
}

/// One tiered POC's kits for every property case.
static KITS: std::sync::OnceLock<Kits> = std::sync::OnceLock::new();
