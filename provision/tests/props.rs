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
