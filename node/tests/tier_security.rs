//! What a region's site accepts of a job its hub derived (`roles::tier`), with real kits from
//! `poc prepare --regions 2`: the hub's signed record over the unchanged original is taken; a
//! forged hub flag, a tampered app, a record without the hub's signature, one signed by
//! another region's hub or by a site, and one for another job or original are refused.

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
    Derivation {
        job_id: job.into(),
        hub: hub.name().into(),
        region: hub.cert.region.clone().unwrap(),
        submitter: "admin@nvidia.com".into(),
        original_signature_sha256: tier::original_hash(bundle),
        changes: DerivedChanges {
            deploy_map: [("app".to_string(), vec!["@ALL".to_string()])].into(),
            min_clients: 2,
        },
    }
}

fn check(
    site: &Kit,
    signed: &tier::SignedDerivation,
    job: &str,
    bundle: &JobBundle,
) -> Result<Derivation, DerivationError> {
    tier::verify(
        signed,
        &site.root_ca,
        site.cert.region.as_deref(),
        &site.config.server.name,
        job,
        bundle,
        SystemTime::now(),
    )
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
    let d = check(&site, &good, id, &bundle).unwrap();
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
        check(&site, &good, id, &other),
        Err(DerivationError::Mismatch(_))
    ));
    // For another job.
    assert!(matches!(
        check(&site, &good, "0123456789ab-0000", &bundle),
        Err(DerivationError::Mismatch(_))
    ));

    // No hub signature: the record with a signature of zeros, or signed by another key.
    let mut unsigned = good.clone();
    unsigned.signature = vec![0; 64];
    assert!(matches!(
        check(&site, &unsigned, id, &bundle),
        Err(DerivationError::Signature)
    ));
    let by_site = tier::sign(
        &record(&hub, id, &bundle),
        &site.identity.signing,
        &hub.cert.der,
    )
    .unwrap();
    assert!(matches!(
        check(&site, &by_site, id, &bundle),
        Err(DerivationError::Signature)
    ));

    // Another region's hub, with its own certificate and key: not this site's hub.
    let foreign = tier::sign(
        &record(&other_hub, id, &bundle),
        &other_hub.identity.signing,
        &other_hub.cert.der,
    )
    .unwrap();
    let e = check(&site, &foreign, id, &bundle).unwrap_err();
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
        check(&site, &as_site, id, &bundle),
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
        let hub = kits.kit("region-1/region-1");
        let site = kits.kit("region-1/site-1");
        let bundle = JobBundle { files: Default::default(), signature: serde_bytes::ByteBuf::from(b"sig".to_vec()) };
        let msg = [b"flare/hub-derivation/v1\0".as_slice(), &record].concat();
        let signed_by_hub = tier::SignedDerivation {
            record: record.clone(),
            signature: hub.identity.signing.sign(&msg).unwrap().to_vec(),
            hub_cert: hub.cert.der.clone(),
        };
        proptest::prop_assert!(check(&site, &signed_by_hub, "0123456789ab-cdef", &bundle).is_err());
        let garbage = tier::SignedDerivation { record, signature, hub_cert: cert };
        proptest::prop_assert!(check(&site, &garbage, "0123456789ab-cdef", &bundle).is_err());
    }
}

/// One tiered POC's kits for every property case.
static KITS: std::sync::OnceLock<Kits> = std::sync::OnceLock::new();
