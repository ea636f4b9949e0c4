//! Property tests for the parsers of untrusted files: project.yml and node.json.

use flare_provision::{NodeConfig, Project};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn project_parser_never_panics(s in "(?s).{0,300}") {
        let _ = Project::parse(&s);
    }

    #[test]
    fn project_parser_never_panics_on_mangled_samples(cut in 0usize..2000, junk in "[ -~]{0,12}") {
        let sample = flare_provision::project::SAMPLE_PROJECT_YML;
        let cut = cut.min(sample.len());
        if sample.is_char_boundary(cut) {
            let s = format!("{}{}{}", &sample[..cut], junk, &sample[cut..]);
            let _ = Project::parse(&s);
        }
    }

    #[test]
    fn node_config_parser_never_panics(s in "(?s).{0,300}") {
        let _ = serde_json::from_str::<NodeConfig>(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random mixes of hubs, sites and admins with random regions never panic, and whatever
    /// is accepted keeps the tiering rules: every region has its hub (and a nested hub its
    /// parent hub), names are unique per region, and hub names in the whole project.
    #[test]
    fn tiered_projects_keep_the_rules(
        ps in proptest::collection::vec((0usize..3, "[ab]{1,2}", proptest::option::of("[ab.]{1,3}")), 0..8)
    ) {
        let mut yml = String::from("api_version: 3\nname: p\nparticipants:\n  - {name: s, type: server, org: o}\n");
        for (kind, name, region) in &ps {
            let kind = ["hub", "client", "admin"][*kind];
            let role = if kind == "admin" { ", role: lead" } else { "" };
            let region = region.as_ref().map(|r| format!(", region: '{r}'")).unwrap_or_default();
            yml.push_str(&format!("  - {{name: '{name}', type: {kind}, org: o{role}{region}}}\n"));
        }
        if let Ok(p) = Project::parse(&yml) {
            let mut seen = std::collections::HashSet::new();
            for q in &p.participants {
                prop_assert!(seen.insert(q.kit_dir()), "two kits in {:?}", q.kit_dir());
                if q.role == flare_crypto::Role::Server {
                    prop_assert!(p.upstream(q).is_none());
                } else {
                    let up = p.upstream(q);
                    prop_assert!(up.is_some(), "{} has no upstream", q.name);
                }
                if let Some(r) = &q.region {
                    prop_assert!(p.hub(r).is_some());
                }
            }
        }
    }
}
