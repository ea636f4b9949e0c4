//! Flare wire types and workflows.
