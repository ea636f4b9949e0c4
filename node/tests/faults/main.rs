//! The fault suite: every fault a hostile-environment test found, and the ones covered
//! elsewhere, each with the behaviour its test proves. Every test here runs real `flare-node`
//! processes from POC kits (see `../common/mod.rs`) and fails without the fix it names.
//!
//! | fault | behaviour proved | test |
//! | --- | --- | --- |
//! | 1. a server restart mid scatter-and-gather wedged the federation | the run resumes after its last persisted round with the same versions; the next job runs | `lifecycle::a_server_restart_resumes_scatter_and_gather` |
//! | 1. a site missed the end of a job (frozen while the server restarted) | its heartbeat frees it; `abort` of the failed job frees its sites; the next job runs on every site | `lifecycle::a_site_frees_a_job_the_server_no_longer_runs` |
//! | 2. a copy of a site's kit started while the site ran was admitted and split a job | the server refuses the second process (it exits, saying why; `admin sites` counts it); the job finishes on the real site; a restarted site is admitted | `identity::a_copy_of_a_site_kit_is_refused_and_the_job_runs_on_the_real_site` |
//! | 2. two nodes started on one participant folder | the second stops at once, naming `node.lock` and the pid holding it | `identity::a_second_start_on_the_same_folder_is_refused_by_the_lock` |
//! | 3. a full disk at the server hung a swarm forever | the failed store is in the history; the upload is retried and stored once there is room; still full, the job fails with the reason | `disk::a_full_disk_at_the_server_is_reported_retried_and_fails_the_job` |
//! | 4. a full disk at a site was invisible; a stale model stayed | each failed save in the history and the site's state; no stale model is evaluated; a deploy onto the full disk is refused as the disk's | `disk::a_full_disk_at_a_site_reaches_the_job_and_leaves_no_stale_model` |
//! | 5. a long scatter-and-gather job slows down and grows the server | `record.json` and the bytes the server writes a round stay the same from round 10 to round 140 | `long_runs::a_long_job_writes_the_same_at_its_last_rounds_as_at_its_first` |
//! | 6. a job naming an absent site waited with no word | `status` says what it waits for, once in the history | `lifecycle::a_job_naming_an_absent_site_says_what_it_waits_for` |
//! | 7. a 57 MB `meta.json` read whole by the admin | refused by its length before reading, naming the file and the cap; the console's peak RSS stays small | `large_jobs::a_57_mb_meta_json_is_refused_before_it_is_read` |
//! | 7. a deploy map of a million names | refused at the admin by counting, naming `deploy_map` and the limit; the largest allowed job is taken | `large_jobs::a_deploy_map_of_too_many_names_is_refused_at_the_admin` |
//! | 8. an admin kit from another CA: "cannot reach the server" after 15 s | exit 3 within seconds, saying the certificate was refused; a down server within seconds | `console::a_kit_from_another_ca_is_told_why_and_a_down_server_is_reported_fast` |
//! | 9, 10. `admin … \| head -1` panicked (exit 101); versions sorted as strings | a closed stdout ends the output quietly; VERSION column and JSON `metrics` keys in numeric order | `console::console_output_survives_a_closed_pipe_and_sorts_versions_as_numbers` |
//! | 10. a site dead mid-swarm showed its last round; scatter-and-gather sites stayed `deployed`; rounds off by one | `away`, then `left (last: …)`; sites end `finished`; `round` counts rounds done | `lifecycle::a_site_that_died_mid_swarm_is_shown_as_left`, `lifecycle::a_server_restart_resumes_scatter_and_gather` |
//! | (covered in `federation.rs`) a site killed mid-job | scatter-and-gather goes on with `min_clients` | `federation::a_dead_site_and_a_server_restart_lose_nothing` |
//! | (covered in `federation.rs`) a swarm's aggregator and the server killed mid-run | re-election, history complete | `federation::swarm_survives_its_aggregator_and_the_server` |
//! | (covered in `netns.rs`) sites with no route to each other | relayed, no model byte in the clear | `netns::swarm_through_the_relay_leaks_no_model_bytes` |
//! | (covered in `federation.rs`) a tampered kit, a bad job | refused, naming the file or key | `federation::bad_jobs_and_kits_are_refused_with_the_reason` |

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod console;
mod disk;
mod identity;
mod large_jobs;
mod lifecycle;
mod long_runs;
