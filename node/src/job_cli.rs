//! `flare-node job`: FLARE's `nvflare job` commands. Make a job folder from a template, change
//! its variables from the command line, look at them, and submit the job without the admin
//! console.
//!
//! ```text
//! flare-node job list-templates
//! flare-node job create -j jobs/fedavg -w sag \
//!     -f config_fed_server.json num_rounds=3 -f config_fed_client.json epochs=1
//! flare-node job show-variables -j jobs/fedavg
//! flare-node job submit -j jobs/fedavg --kit <admin>/startup
//! ```
//!
//! FLARE's spellings `list_templates` and `show_variables` are aliases; its options are
//! spelled with dashes (`--job-folder`, `--config-file`), their short forms are FLARE's.
//!
//! # Templates
//!
//! A template is a job folder (`meta.json`, `app/config/config_fed_server.json`,
//! `config_fed_client.json`, and whatever else the app brings: `custom/`, `models/`) plus an
//! `info.md` whose title (`# <name>: <what it is>`) is the description `list-templates` shows.
//! The repository ships them in `job_templates/<name>/`: `sag` (the default, as FLARE's default
//! is `sag_pt`), `swarm`, `cyclic`, `swarm_cse`, `sag_pt` (the Client API) and `tiered_sag`.
//! The folder is, in order: `--dir`, `$FLARE_JOB_TEMPLATES`, the first `job_templates/` in the
//! current directory or one above it, the first beside the executable or above it (a
//! `target/release/flare-node` of the repository). `-w` also takes a path to a template folder
//! of one's own.
//!
//! # Create
//!
//! `create` copies the template (without its `info.md`) into the job folder, names the job
//! after the folder (`meta.json`'s `name`, as FLARE does), applies `--script`, then each
//! `-f FILE KEY=VALUE …` in order, and loads the result with [`Job::load`]; only a job that
//! loads is put in place (it is built in a hidden folder beside the target and renamed), so a
//! refused command leaves nothing behind. An existing job folder is replaced only with
//! `--force`, and only if it is a job folder (it has a `meta.json`) or empty.
//!
//! - `-f` takes a file, then its variables; a word without `=` is the next file, so
//!   `-f a.json k=1 b.json k=2` is `-f a.json k=1 -f b.json k=2`.
//! - `FILE` is a config file of the job: `meta.json`, or a file of `<app>/config/` by its name
//!   (`config_fed_server.json`), its path in the job (`app/config/config_fed_server.json`,
//!   for a job of several apps) or its stem (`config_fed_server`, and FLARE's
//!   `config_fed_server.conf` names the same file).
//! - `KEY` is a path in the file, `workflows[0].args.num_rounds`, `deploy_map.app`,
//!   `["a.key"]` for a key with a dot; or only the last key, `num_rounds`, when exactly one key
//!   of the file has that name (a key at the top of the file is its own path). An ambiguous
//!   name is refused with its paths. Only keys that exist can be set: to add an argument the
//!   template leaves at its default, edit the file.
//! - `VALUE` is read as JSON when it parses (`3`, `0.5`, `true`, `null`, `["a", "b"]`,
//!   `{"kind": "dirichlet", "alpha": 0.5}`) and is a string otherwise (`random`, `FedProx`);
//!   `'"5"'` is the string `5`. JSON files are edited in place: only the value's text
//!   changes, the rest of the file keeps its layout. YAML files are written again (their
//!   comments are lost).
//! - `--script train.py` (Client API templates: their client runs a `ScriptExecutor`) copies the
//!   script into `app/custom/`, in place of the template's script, and points the executor's
//!   `command` at it: the interpreter part of the command stays, the template script's own
//!   arguments go, and `--script-args "…"` (split at whitespace) follows the script.
//!
//! Every refusal names the template, the file and the key:
//! `job_templates/swarm: config_fed_server.json: workflows[0].args.num_roundz: no such key (did
//! you mean num_rounds?)`; a value [`Job::load`] refuses is reported with its message
//! (`…: workflows[0].args.num_rounds: invalid type: string "two", expected u32`).
//!
//! # Show and submit
//!
//! `show-variables` lists every settable leaf of every config file of a job folder (scalars,
//! lists of scalars and empty objects; deeper structures by their leaves), with its value and
//! the component it belongs to, as a table or `--json`. `submit` signs the folder with the
//! admin kit's key and submits it as `flare-node admin submit` does, printing the job id alone
//! on stdout (`JOB=$(flare-node job submit …)`).

use std::fmt::Display;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde::Serialize;
use serde_json::Value;

use crate::job::{Job, JobError, MAX_CONFIG_BYTES};
use crate::net::protocol::AdminRequest;
use crate::roles::admin::{AdminSession, Console};

/// The templates folder of the repository.
pub const TEMPLATES_DIR: &str = "job_templates";
/// An environment variable naming the templates folder.
pub const TEMPLATES_ENV: &str = "FLARE_JOB_TEMPLATES";
/// The template `create` uses without `-w` (FLARE's default is `sag_pt`).
pub const DEFAULT_TEMPLATE: &str = "sag";
/// A template's description, left out of the jobs made from it.
pub const INFO_FILE: &str = "info.md";
/// Executors that run the user's own script (the Client API).
const SCRIPT_EXECUTORS: [&str; 2] = ["ScriptExecutor", "ClientAPILauncherExecutor"];
/// The deepest folder nesting copied from a template.
const MAX_COPY_DEPTH: usize = 16;

/// `flare-node job …`.
#[derive(Debug, Clone, Subcommand)]
pub enum JobCommand {
    /// List the job templates: their workflow, executor and what each is for.
    #[command(alias = "list_templates")]
    ListTemplates {
        /// The templates folder [default: job_templates/ found from the current directory,
        /// then beside the executable].
        #[arg(short, long, value_name = "TEMPLATES_DIR")]
        dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a job folder from a template and set its variables.
    Create {
        /// The job folder to make.
        #[arg(short, long = "job-folder", value_name = "JOB_DIR")]
        job: PathBuf,
        /// The template: a name from list-templates, or a template folder.
        #[arg(short = 'w', long, default_value = DEFAULT_TEMPLATE)]
        template: String,
        /// The templates folder [default: as list-templates].
        #[arg(short, long, value_name = "TEMPLATES_DIR")]
        dir: Option<PathBuf>,
        /// A config file of the job and the variables to set in it, e.g.
        /// `-f config_fed_server.json num_rounds=3 workflows[0].args.min_clients=2`
        /// (repeatable).
        #[arg(short = 'f', long = "config-file", num_args = 1.., value_names = ["FILE", "KEY=VALUE"])]
        config: Vec<String>,
        /// Your training script, for a Client API template (sag_pt): copied into the app's
        /// custom/ folder and run by the ScriptExecutor.
        #[arg(long, value_name = "SCRIPT")]
        script: Option<PathBuf>,
        /// The script's arguments, split at whitespace (with --script).
        #[arg(
            long,
            value_name = "ARGS",
            allow_hyphen_values = true,
            requires = "script"
        )]
        script_args: Option<String>,
        /// Replace the job folder if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Every settable variable of a job folder's config files, with its value.
    #[command(alias = "show_variables")]
    ShowVariables {
        /// The job folder.
        #[arg(short, long = "job-folder", value_name = "JOB_DIR")]
        job: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Sign a job folder with an admin kit and submit it; prints the job id.
    Submit {
        /// The job folder.
        #[arg(short, long = "job-folder", value_name = "JOB_DIR")]
        job: PathBuf,
        /// The admin's startup kit folder.
        #[arg(long, value_name = "STARTUP_DIR")]
        kit: PathBuf,
        /// Print the server's answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `job` command.
pub fn run(cmd: JobCommand) -> anyhow::Result<()> {
    let mut out = Console::stdout();
    match cmd {
        JobCommand::ListTemplates { dir, json } => {
            let dir = templates_dir(dir.as_deref())?;
            let list = list_templates(&dir)?;
            if json {
                out.line(serde_json::to_string_pretty(&list)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.controller.clone(),
                            t.workflows.join(" + "),
                            t.executor.clone(),
                            match &t.problem {
                                Some(p) => format!("INVALID: {p}"),
                                None => t.description.clone(),
                            },
                        ]
                    })
                    .collect();
                out.line(format_args!("templates in {}", dir.display()));
                out.line(table(
                    &["NAME", "CONTROLLER", "WORKFLOW", "EXECUTOR", "DESCRIPTION"],
                    &rows,
                ));
            }
        }
        JobCommand::Create {
            job,
            template,
            dir,
            config,
            script,
            script_args,
            force,
        } => {
            let edits = group_edits(&config)?;
            let created = create(&CreateOptions {
                job_dir: job,
                template,
                templates_dir: dir,
                edits,
                script,
                script_args: script_args
                    .map(|a| a.split_whitespace().map(String::from).collect())
                    .unwrap_or_default(),
                force,
            })?;
            print_created(&mut out, &created);
        }
        JobCommand::ShowVariables { job, json } => {
            let vars = show_variables(&job)?;
            if json {
                out.line(serde_json::to_string_pretty(&vars)?);
            } else {
                let rows: Vec<Vec<String>> = vars
                    .iter()
                    .map(|v| {
                        vec![
                            v.file.clone(),
                            v.key.clone(),
                            shown_value(&v.value),
                            v.component.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                out.line(table(&["FILE", "KEY", "VALUE", "COMPONENT"], &rows));
            }
        }
        JobCommand::Submit { job, kit, json } => {
            let s = submit(&job, &kit)?;
            if json {
                out.line(serde_json::json!({ "job_id": s.job_id, "name": s.name }));
            } else {
                out.line(&s.job_id);
                // A closed stderr loses only the hint.
                let _ = writeln!(
                    std::io::stderr(),
                    "submitted {} as job {}; follow it with: flare-node admin --kit {} wait {}",
                    s.name,
                    s.job_id,
                    kit.display(),
                    s.job_id
                );
            }
        }
    }
    Ok(())
}

/// The values of every `-f` in order, grouped: a word without `=` is a file and starts a
/// group, the `KEY=VALUE` words after it are its variables.
pub fn group_edits(words: &[String]) -> anyhow::Result<Vec<ConfigEdits>> {
    let mut out: Vec<ConfigEdits> = Vec::new();
    for w in words {
        match out.last_mut() {
            Some(edit) if w.contains('=') => edit.sets.push(w.clone()),
            _ if w.contains('=') => {
                bail!("-f {w}: name the config file first (-f config_fed_server.json {w})")
            }
            _ => out.push(ConfigEdits {
                file: w.clone(),
                sets: Vec::new(),
            }),
        }
    }
    Ok(out)
}

fn print_created(out: &mut Console, c: &Created) {
    out.line(format_args!(
        "created {} from {}",
        c.job_dir.display(),
        c.template
    ));
    if !c.changes.is_empty() {
        let rows: Vec<Vec<String>> = c
            .changes
            .iter()
            .map(|ch| {
                vec![
                    ch.file.clone(),
                    ch.key.clone(),
                    shown_value(&ch.old),
                    shown_value(&ch.new),
                ]
            })
            .collect();
        out.line(table(&["FILE", "KEY", "WAS", "NOW"], &rows));
    }
    let dir = c.job_dir.display();
    let regions = if c.tiered { "--regions 2 " } else { "" };
    out.line(format_args!(
        "simulate it: flare-node simulate {dir} {regions}-n {}",
        c.min_clients
    ));
    out.line(format_args!(
        "submit it:   flare-node job submit -j {dir} --kit <admin startup kit>"
    ));
}

// ---------------------------------------------------------------------------------------------
// Templates

/// One template, as `list-templates` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateInfo {
    /// The folder name, what `-w` takes.
    pub name: String,
    /// The template folder.
    pub dir: PathBuf,
    /// The title of its `info.md` (without `# <name>:`), else its first paragraph.
    pub description: String,
    /// `server` (scatter-and-gather: the server aggregates) or `client` (swarm, cyclic: the
    /// sites run the rounds), as FLARE's controller type.
    pub controller: String,
    /// The server's workflows, in order.
    pub workflows: Vec<String>,
    /// The clients' executor (`MnistMlpLearner`, `ScriptExecutor`, …).
    pub executor: String,
    /// Why the template is not a valid job, if it is not.
    pub problem: Option<String>,
}

/// The templates folder: `explicit`, else `$FLARE_JOB_TEMPLATES`, else the first
/// `job_templates/` in the current directory or above it, else beside the executable or above
/// it. The error says where it looked.
pub fn templates_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = explicit {
        if d.is_dir() {
            return Ok(d.to_path_buf());
        }
        bail!("templates folder {}: no such folder", d.display());
    }
    if let Some(d) = std::env::var_os(TEMPLATES_ENV) {
        let d = PathBuf::from(d);
        if d.is_dir() {
            return Ok(d);
        }
        bail!(
            "templates folder {} (from ${TEMPLATES_ENV}): no such folder",
            d.display()
        );
    }
    let mut looked = Vec::new();
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    for (what, start) in [
        ("the current directory", cwd.as_deref()),
        ("the executable", exe.as_deref().and_then(Path::parent)),
    ] {
        let Some(start) = start else { continue };
        if let Some(found) = start
            .ancestors()
            .map(|a| a.join(TEMPLATES_DIR))
            .find(|d| d.is_dir())
        {
            return Ok(found);
        }
        looked.push(format!("{what} ({}) and above", start.display()));
    }
    bail!(
        "no {TEMPLATES_DIR}/ folder found: looked in {} (give --dir <templates dir> or set ${TEMPLATES_ENV})",
        looked.join(", and beside ")
    )
}

/// The templates in `dir`: every folder with a `meta.json`, by name.
pub fn list_templates(dir: &Path) -> anyhow::Result<Vec<TemplateInfo>> {
    let mut out = Vec::new();
    for name in template_names(dir)? {
        let tdir = dir.join(&name);
        let description = describe(&tdir, &name);
        let mut info = TemplateInfo {
            name,
            dir: tdir.clone(),
            description,
            controller: "-".into(),
            workflows: Vec::new(),
            executor: "-".into(),
            problem: None,
        };
        match Job::load(&tdir) {
            Ok(job) => {
                info.controller = if job.server.workflow.client_controlled() {
                    "client".into()
                } else {
                    "server".into()
                };
                let mut executors = Vec::new();
                for file in config_files(&tdir)? {
                    let Ok(doc) = Doc::load(&file) else { continue };
                    for wf in doc.value["workflows"].as_array().into_iter().flatten() {
                        if let Some(n) = wf["name"].as_str() {
                            info.workflows.push(n.to_string());
                        }
                    }
                    for ex in doc.value["executors"].as_array().into_iter().flatten() {
                        if let Some(n) = ex["executor"]["name"].as_str()
                            && !executors.iter().any(|e| e == n)
                        {
                            executors.push(n.to_string());
                        }
                    }
                }
                if !executors.is_empty() {
                    info.executor = executors.join(", ");
                }
            }
            Err(e) => info.problem = Some(job_error(&e, &tdir, &config_files(&tdir)?)),
        }
        out.push(info);
    }
    Ok(out)
}

/// The folders of `dir` that hold a `meta.json`, sorted.
fn template_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("templates folder {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("templates folder {}", dir.display()))?;
        if e.path().join("meta.json").is_file()
            && let Some(n) = e.file_name().to_str()
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// A template's description from its `info.md`: the title after `<name>:`, else the first
/// paragraph; `-` without one.
fn describe(tdir: &Path, name: &str) -> String {
    let Ok(text) = read_capped(&tdir.join(INFO_FILE)) else {
        return "-".into();
    };
    let mut lines = text.lines().map(str::trim).skip_while(|l| l.is_empty());
    if let Some(title) = lines.clone().next().and_then(|l| l.strip_prefix('#')) {
        let title = title.trim_start_matches('#').trim();
        let title = title
            .strip_prefix(name)
            .and_then(|t| t.strip_prefix(':'))
            .unwrap_or(title)
            .trim();
        if !title.is_empty() {
            return title.to_string();
        }
        lines.next();
    }
    let para: Vec<&str> = lines
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    if para.is_empty() {
        "-".into()
    } else {
        para.join(" ")
    }
}

/// A template by name in the templates folder, or a template folder given as a path; with
/// the label errors name it by (`job_templates/sag`).
fn find_template(template: &str, explicit_dir: Option<&Path>) -> anyhow::Result<(PathBuf, String)> {
    let as_path = Path::new(template);
    if template.contains(std::path::MAIN_SEPARATOR) || template.starts_with('.') {
        if as_path.join("meta.json").is_file() {
            return Ok((as_path.to_path_buf(), template.to_string()));
        }
        bail!("template {template}: not a template folder (no meta.json in it)");
    }
    let dir = templates_dir(explicit_dir)?;
    let label_dir = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let tdir = dir.join(template);
    if tdir.join("meta.json").is_file() {
        return Ok((tdir, format!("{label_dir}/{template}")));
    }
    let names = template_names(&dir)?;
    let hint = match suggest(template, names.iter().map(String::as_str)) {
        Some(s) => format!("did you mean {s}? "),
        None => String::new(),
    };
    bail!(
        "no template {template:?} in {} ({hint}templates: {})",
        dir.display(),
        names.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Create

/// The variables to set in one config file: `-f FILE KEY=VALUE …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEdits {
    /// The file: `meta.json`, a config file's name, stem or path in the job.
    pub file: String,
    /// `KEY=VALUE`, in order.
    pub sets: Vec<String>,
}

/// What `job create` does.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The job folder to make.
    pub job_dir: PathBuf,
    /// A template name, or a path to a template folder.
    pub template: String,
    /// The templates folder ([`templates_dir`] when `None`).
    pub templates_dir: Option<PathBuf>,
    /// The variables to set, file by file, in order.
    pub edits: Vec<ConfigEdits>,
    /// The user's training script (Client API templates).
    pub script: Option<PathBuf>,
    /// The script's arguments.
    pub script_args: Vec<String>,
    /// Replace an existing job folder.
    pub force: bool,
}

/// One variable `create` changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The file, as [`show_variables`] names it.
    pub file: String,
    /// The key's full path.
    pub key: String,
    /// The template's value.
    pub old: Value,
    /// The value set.
    pub new: Value,
}

/// A job folder `create` made.
#[derive(Debug, Clone)]
pub struct Created {
    /// The job folder.
    pub job_dir: PathBuf,
    /// The template, as errors name it (`job_templates/sag`).
    pub template: String,
    /// The variables set, in order (`--script`'s command first).
    pub changes: Vec<Change>,
    /// `meta.json`'s `min_clients`, for the hint to simulate it.
    pub min_clients: usize,
    /// Whether the job is tiered (it simulates with `--regions`).
    pub tiered: bool,
}

/// Makes a job folder from a template (see the module doc); the job loads with [`Job::load`].
pub fn create(opts: &CreateOptions) -> anyhow::Result<Created> {
    let (tdir, label) = find_template(&opts.template, opts.templates_dir.as_deref())?;
    let job_dir = &opts.job_dir;
    let name = job_dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .with_context(|| {
            format!(
                "job folder {}: give it a name (its last component names the job)",
                job_dir.display()
            )
        })?
        .to_string();
    let parent = match job_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("{}", parent.display()))?;
    check_target(job_dir, &parent, &name, &tdir, opts.force)?;

    let staging = Staging::new(&parent, &name)?;
    copy_tree(&tdir, &staging.path, 0, true)
        .with_context(|| format!("{label}: cannot copy the template"))?;
    let files = config_files(&staging.path).with_context(|| label.clone())?;
    let fail = |msg: String| anyhow::anyhow!("{label}: {msg}");

    // The job is named after its folder.
    let meta = files
        .iter()
        .find(|f| f.shown == "meta.json")
        .ok_or_else(|| fail("meta.json: missing".into()))?;
    let mut doc = Doc::load(meta).map_err(fail)?;
    doc.set(&[Seg::Key("name".into())], &Value::String(name))
        .map_err(fail)?;
    doc.save().map_err(fail)?;

    let mut changes = Vec::new();
    if let Some(script) = &opts.script {
        changes.extend(apply_script(&files, script, &opts.script_args).map_err(fail)?);
    }
    for edit in &opts.edits {
        let file = resolve_file(&files, &edit.file).map_err(fail)?;
        let mut doc = Doc::load(file).map_err(fail)?;
        for set in &edit.sets {
            let (key, raw) = set.split_once('=').ok_or_else(|| {
                fail(format!(
                    "{}: {set:?}: expected KEY=VALUE (files are named by -f FILE)",
                    file.shown
                ))
            })?;
            let key = key.trim();
            let path = doc
                .resolve(key)
                .map_err(|why| fail(format!("{}: {key}: {why}", file.shown)))?;
            let new = parse_value(raw);
            let old = doc.get(&path).cloned().unwrap_or(Value::Null);
            doc.set(&path, &new)
                .map_err(|why| fail(format!("{}: {key}: {why}", file.shown)))?;
            changes.push(Change {
                file: file.shown.clone(),
                key: fmt_path(&path),
                old,
                new,
            });
        }
        doc.save().map_err(fail)?;
    }

    let job = Job::load(&staging.path).map_err(|e| fail(job_error(&e, &staging.path, &files)))?;
    let created = Created {
        job_dir: job_dir.clone(),
        template: label,
        changes,
        min_clients: job.meta.min_clients,
        tiered: job.server.tiered.is_some(),
    };
    staging.commit(job_dir)?;
    Ok(created)
}

/// Refuses a job folder that exists (without `--force`), that is not a job folder, or that
/// holds the template or lies inside it.
fn check_target(
    job_dir: &Path,
    parent: &Path,
    name: &str,
    tdir: &Path,
    force: bool,
) -> anyhow::Result<()> {
    let canon = |p: &Path| p.canonicalize().with_context(|| p.display().to_string());
    let target = canon(parent)?.join(name);
    let template = canon(tdir)?;
    if template.starts_with(&target) || target.starts_with(&template) {
        bail!(
            "job folder {}: it would overwrite the template {}",
            job_dir.display(),
            tdir.display()
        );
    }
    let Ok(meta) = std::fs::symlink_metadata(job_dir) else {
        return Ok(());
    };
    if !force {
        bail!(
            "job folder {} exists (give --force to replace it)",
            job_dir.display()
        );
    }
    if !meta.is_dir() {
        bail!(
            "{} exists and is not a folder; not replacing it",
            job_dir.display()
        );
    }
    let empty = std::fs::read_dir(job_dir)
        .with_context(|| job_dir.display().to_string())?
        .next()
        .is_none();
    if !empty && !job_dir.join("meta.json").is_file() {
        bail!(
            "{} is not a job folder (no meta.json); --force replaces only job folders",
            job_dir.display()
        );
    }
    Ok(())
}

/// A hidden folder beside the job folder where the job is made; removed on drop unless
/// committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(parent: &Path, name: &str) -> anyhow::Result<Staging> {
        let pid = std::process::id();
        for n in 0..100u32 {
            let path = parent.join(format!(".{name}.creating-{pid}-{n}"));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    return Ok(Staging {
                        path,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| path.display().to_string()),
            }
        }
        bail!("cannot make a working folder in {}", parent.display())
    }

    /// Puts the job in place of `job_dir` (whatever was there goes).
    fn commit(mut self, job_dir: &Path) -> anyhow::Result<()> {
        if std::fs::symlink_metadata(job_dir).is_ok() {
            let old = self.path.with_extension("old");
            std::fs::rename(job_dir, &old)
                .with_context(|| format!("cannot replace {}", job_dir.display()))?;
            if let Err(e) = std::fs::rename(&self.path, job_dir) {
                // Put the old folder back.
                let _ = std::fs::rename(&old, job_dir);
                return Err(e).with_context(|| format!("cannot make {}", job_dir.display()));
            }
            self.committed = true;
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("cannot remove the old job folder {}", old.display()))?;
        } else {
            std::fs::rename(&self.path, job_dir)
                .with_context(|| format!("cannot make {}", job_dir.display()))?;
            self.committed = true;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Copies the folder `from` into `to` (which exists): plain files and folders only, without
/// `__pycache__/` and, at the top, the template's `info.md`.
fn copy_tree(from: &Path, to: &Path, depth: usize, top: bool) -> anyhow::Result<()> {
    if depth > MAX_COPY_DEPTH {
        bail!("{}: folders nested too deep", from.display());
    }
    let mut entries = std::fs::read_dir(from)
        .with_context(|| from.display().to_string())?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| from.display().to_string())?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if (top && name == INFO_FILE) || name == "__pycache__" {
            continue;
        }
        let src = e.path();
        let dst = to.join(&name);
        let ty = e.file_type().with_context(|| src.display().to_string())?;
        if ty.is_dir() {
            std::fs::create_dir(&dst).with_context(|| dst.display().to_string())?;
            copy_tree(&src, &dst, depth + 1, false)?;
        } else if ty.is_file() {
            std::fs::copy(&src, &dst).with_context(|| src.display().to_string())?;
        } else {
            bail!(
                "{}: a link or special file (templates hold plain files and folders)",
                src.display()
            );
        }
    }
    Ok(())
}

/// `--script`: copies `script` into the custom folder of every app whose client runs a
/// `ScriptExecutor` and points its command at it.
fn apply_script(
    files: &[ConfigFile],
    script: &Path,
    args: &[String],
) -> Result<Vec<Change>, String> {
    let meta =
        std::fs::metadata(script).map_err(|e| format!("--script {}: {e}", script.display()))?;
    if !meta.is_file() {
        return Err(format!("--script {}: not a file", script.display()));
    }
    let script_name = script
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| format!("--script {}: a file name it cannot use", script.display()))?;
    let mut changes = Vec::new();
    let mut others = Vec::new();
    for file in files.iter().filter(|f| f.stem() == "config_fed_client") {
        let mut doc = Doc::load(file)?;
        let count = doc.value["executors"].as_array().map_or(0, Vec::len);
        for i in 0..count {
            let executor = doc.value["executors"][i]["executor"]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            if !SCRIPT_EXECUTORS.contains(&executor.as_str()) {
                others.push(executor);
                continue;
            }
            let path = vec![
                Seg::Key("executors".into()),
                Seg::Index(i),
                Seg::Key("executor".into()),
                Seg::Key("args".into()),
                Seg::Key("command".into()),
            ];
            let key = fmt_path(&path);
            let old = doc.get(&path).cloned().unwrap_or(Value::Null);
            let command: Vec<String> = old
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let at = command
                .iter()
                .position(|c| c.starts_with("custom/"))
                .ok_or_else(|| {
                    format!(
                        "{}: {key}: names no script under custom/ for --script to replace",
                        file.shown
                    )
                })?;
            let app = file.app_dir();
            let custom = app.join("custom");
            std::fs::create_dir_all(&custom).map_err(|e| format!("{}: {e}", custom.display()))?;
            let old_script = app.join(&command[at]);
            if command[at] != format!("custom/{script_name}") && old_script.is_file() {
                std::fs::remove_file(&old_script)
                    .map_err(|e| format!("{}: {e}", old_script.display()))?;
            }
            std::fs::copy(script, custom.join(script_name))
                .map_err(|e| format!("--script {}: {e}", script.display()))?;
            let mut new_command: Vec<String> = command[..at].to_vec();
            new_command.push(format!("custom/{script_name}"));
            new_command.extend(args.iter().cloned());
            let new = Value::from(new_command);
            doc.set(&path, &new)
                .map_err(|why| format!("{}: {key}: {why}", file.shown))?;
            changes.push(Change {
                file: file.shown.clone(),
                key,
                old,
                new,
            });
        }
        doc.save()?;
    }
    if changes.is_empty() {
        return Err(format!(
            "--script needs a Client API template, whose client runs a ScriptExecutor (such as sag_pt); this one's runs {}",
            if others.is_empty() {
                "no executor".to_string()
            } else {
                others.join(", ")
            }
        ));
    }
    Ok(changes)
}

// ---------------------------------------------------------------------------------------------
// Variables

/// One settable variable of a job folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variable {
    /// The file: `meta.json`, or a config file's name (its path in the job when the job has
    /// several apps).
    pub file: String,
    /// The key's full path (`workflows[0].args.num_rounds`).
    pub key: String,
    /// Its value.
    pub value: Value,
    /// The `name` of the component, workflow or executor it belongs to.
    pub component: Option<String>,
}

/// Every settable leaf of every config file of the job folder, file by file in the files'
/// order.
pub fn show_variables(job_dir: &Path) -> anyhow::Result<Vec<Variable>> {
    if !job_dir.join("meta.json").is_file() {
        bail!(
            "{}: not a job folder (no meta.json in it)",
            job_dir.display()
        );
    }
    let files = config_files(job_dir).with_context(|| job_dir.display().to_string())?;
    let mut vars = Vec::new();
    for file in &files {
        let doc = Doc::load(file).map_err(|e| anyhow::anyhow!("{}: {e}", job_dir.display()))?;
        for path in doc.leaves() {
            let Some(value) = doc.get(&path) else {
                continue;
            };
            vars.push(Variable {
                file: file.shown.clone(),
                key: fmt_path(&path),
                value: value.clone(),
                component: component_of(&doc.value, &path),
            });
        }
    }
    Ok(vars)
}

/// The `name` of the deepest object above the leaf (not the file itself) that has one.
fn component_of(root: &Value, path: &[Seg]) -> Option<String> {
    let mut cur = root;
    let mut found = None;
    for (i, seg) in path.iter().enumerate() {
        cur = seg.get(cur)?;
        if i + 1 < path.len()
            && let Some(n) = cur.get("name").and_then(Value::as_str)
        {
            found = Some(n.to_string());
        }
    }
    found
}

/// A value as the user gave it: JSON when it parses, else the text as a string.
fn parse_value(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

/// A value in a table: strings bare, the rest as JSON.
fn shown_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => inline_json(other),
    }
}

/// JSON on one line, spaced as the shipped configs are (`["train", "validate"]`).
fn inline_json(v: &Value) -> String {
    match v {
        Value::Array(a) if !a.is_empty() => {
            let items: Vec<String> = a.iter().map(inline_json).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(m) if !m.is_empty() => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), inline_json(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Whether a value is a variable of its own: a scalar, a list of scalars or an empty object.
fn is_leaf(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.iter().all(|x| !x.is_object() && !x.is_array()),
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------------
// Config files

/// One config file of a job folder.
#[derive(Debug, Clone)]
struct ConfigFile {
    path: PathBuf,
    /// How messages and tables name it.
    shown: String,
    yaml: bool,
}

impl ConfigFile {
    fn stem(&self) -> &str {
        self.path.file_stem().and_then(|s| s.to_str()).unwrap_or("")
    }

    /// The app folder of a file in `<app>/config/`.
    fn app_dir(&self) -> PathBuf {
        self.path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Its path in the job folder.
    fn rel(&self) -> String {
        let mut parts: Vec<String> = self
            .path
            .components()
            .rev()
            .take(if self.shown == "meta.json" { 1 } else { 3 })
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        parts.reverse();
        parts.join("/")
    }
}

/// `meta.json`, then the JSON and YAML files of each app's `config/` folder (apps by name;
/// in each, the server's config, the client's, then the others by name).
fn config_files(job_dir: &Path) -> anyhow::Result<Vec<ConfigFile>> {
    let mut out = Vec::new();
    let meta = job_dir.join("meta.json");
    if meta.is_file() {
        out.push(ConfigFile {
            path: meta,
            shown: "meta.json".into(),
            yaml: false,
        });
    }
    let mut apps = Vec::new();
    for e in std::fs::read_dir(job_dir).with_context(|| job_dir.display().to_string())? {
        let e = e.with_context(|| job_dir.display().to_string())?;
        let config = e.path().join("config");
        if config.is_dir()
            && let Some(app) = e.file_name().to_str()
        {
            apps.push((app.to_string(), config));
        }
    }
    apps.sort();
    let several = apps.len() > 1;
    for (app, config) in apps {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&config).with_context(|| config.display().to_string())? {
            let e = e.with_context(|| config.display().to_string())?;
            let path = e.path();
            let Some(name) = e.file_name().to_str().map(String::from) else {
                continue;
            };
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            if !path.is_file() || !matches!(ext, "json" | "yml" | "yaml") {
                continue;
            }
            let rank = if name.starts_with("config_fed_server.") {
                0
            } else if name.starts_with("config_fed_client.") {
                1
            } else {
                2
            };
            let shown = if several {
                format!("{app}/config/{name}")
            } else {
                name.clone()
            };
            let yaml = ext != "json";
            files.push((rank, name, ConfigFile { path, shown, yaml }));
        }
        files.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out.extend(files.into_iter().map(|(_, _, f)| f));
    }
    Ok(out)
}

/// The file `-f` names: as shown, by its path in the job, by name, or by stem (so FLARE's
/// `config_fed_server.conf` is `config_fed_server.json`).
fn resolve_file<'a>(files: &'a [ConfigFile], given: &str) -> Result<&'a ConfigFile, String> {
    let given_trim = given.trim_start_matches("./");
    let name_of = |f: &ConfigFile| {
        f.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let given_stem = Path::new(given_trim)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(given_trim);
    let tries: [&dyn Fn(&ConfigFile) -> bool; 3] = [
        &|f| f.shown == given_trim || f.rel() == given_trim,
        &|f| name_of(f) == given_trim,
        &|f| !given_trim.contains('/') && f.stem() == given_stem,
    ];
    for matches in tries {
        let found: Vec<&ConfigFile> = files.iter().filter(|f| matches(f)).collect();
        match found.as_slice() {
            [one] => return Ok(one),
            [] => continue,
            many => {
                let names: Vec<&str> = many.iter().map(|f| f.shown.as_str()).collect();
                return Err(format!(
                    "{given}: several config files have that name ({}): name one by its path",
                    names.join(", ")
                ));
            }
        }
    }
    let names: Vec<&str> = files.iter().map(|f| f.shown.as_str()).collect();
    let hint = if given.contains('.') {
        ""
    } else {
        "; a variable is KEY=VALUE, without spaces"
    };
    Err(format!(
        "{given}: no such config file (the job has {}{hint})",
        names.join(", ")
    ))
}

/// Reads a config file, refusing one over [`MAX_CONFIG_BYTES`] before reading it.
fn read_capped(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(format!("{len} bytes, at most {MAX_CONFIG_BYTES}"));
    }
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("more than {MAX_CONFIG_BYTES} bytes"));
    }
    Ok(text)
}

/// A loaded config file: its text, its value, and its nodes in document order.
#[derive(Debug)]
struct Doc {
    file: ConfigFile,
    text: String,
    value: Value,
    /// Every node but the root, in document order, with (JSON) its byte range in `text`.
    nodes: Spans,
}

impl Doc {
    fn load(file: &ConfigFile) -> Result<Doc, String> {
        let text = read_capped(&file.path).map_err(|e| format!("{}: {e}", file.shown))?;
        let mut doc = Doc {
            file: file.clone(),
            text,
            value: Value::Null,
            nodes: Vec::new(),
        };
        doc.parse()?;
        Ok(doc)
    }

    fn parse(&mut self) -> Result<(), String> {
        let bad = |e: &dyn Display| format!("{}: not valid: {e}", self.file.shown);
        if self.file.yaml {
            let y: serde_yaml::Value = serde_yaml::from_str(&self.text).map_err(|e| bad(&e))?;
            self.value = serde_json::to_value(&y).map_err(|e| bad(&e))?;
            let mut nodes = Vec::new();
            yaml_paths(&y, &mut Vec::new(), &mut nodes, 0);
            self.nodes = nodes.into_iter().map(|p| (p, 0..0)).collect();
        } else {
            self.value = serde_json::from_str(&self.text).map_err(|e| bad(&e))?;
            self.nodes = json_spans(&self.text).map_err(|e| bad(&e))?;
        }
        self.nodes.retain(|(p, _)| !p.is_empty());
        Ok(())
    }

    fn get(&self, path: &[Seg]) -> Option<&Value> {
        path.iter().try_fold(&self.value, |cur, s| s.get(cur))
    }

    /// The settable leaves, in document order (not the items of a list of scalars).
    fn leaves(&self) -> Vec<Vec<Seg>> {
        let mut out: Vec<Vec<Seg>> = Vec::new();
        for (path, _) in &self.nodes {
            if out.last().is_some_and(|l| path.starts_with(l)) {
                continue;
            }
            if self.get(path).is_some_and(is_leaf) {
                out.push(path.clone());
            }
        }
        out
    }

    /// The path `key` names: a full path that exists, or the name of exactly one key.
    fn resolve(&self, key: &str) -> Result<Vec<Seg>, String> {
        if key.is_empty() {
            return Err("no key before '='".into());
        }
        if key.contains(['.', '[', ']', '"']) {
            let path = parse_path(key)?;
            return match self.get(&path) {
                Some(_) => Ok(path),
                None => Err(self.missing(&path)),
            };
        }
        let top = [Seg::Key(key.to_string())];
        if self.get(&top).is_some() {
            return Ok(top.to_vec());
        }
        let found: Vec<&Vec<Seg>> = self
            .nodes
            .iter()
            .map(|(p, _)| p)
            .filter(|p| matches!(p.last(), Some(Seg::Key(k)) if k == key))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.to_vec()),
            [] => {
                let mut names: Vec<&str> = self
                    .nodes
                    .iter()
                    .filter_map(|(p, _)| match p.last() {
                        Some(Seg::Key(k)) => Some(k.as_str()),
                        _ => None,
                    })
                    .collect();
                names.sort_unstable();
                names.dedup();
                Err(match suggest(key, names.iter().copied()) {
                    Some(s) => format!("no such key (did you mean {s}?)"),
                    None => "no such key".into(),
                })
            }
            many => {
                let paths: Vec<String> = many.iter().map(|p| fmt_path(p)).collect();
                Err(format!(
                    "ambiguous: {} keys have that name; name one by its path: {}",
                    many.len(),
                    paths.join(", ")
                ))
            }
        }
    }

    /// Why a full path names nothing, with the nearest key.
    fn missing(&self, path: &[Seg]) -> String {
        let mut cur = &self.value;
        for (i, seg) in path.iter().enumerate() {
            let here = fmt_path(&path[..i]);
            let here = if here.is_empty() {
                "the file".to_string()
            } else {
                here
            };
            match (seg, cur) {
                (Seg::Key(k), Value::Object(m)) => match m.get(k) {
                    Some(next) => cur = next,
                    None => {
                        return match suggest(k, m.keys().map(String::as_str)) {
                            Some(s) => format!("no such key (did you mean {s}?)"),
                            None if m.is_empty() => format!("no such key ({here} is empty)"),
                            None => {
                                let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                                format!("no such key ({here} has {})", keys.join(", "))
                            }
                        };
                    }
                },
                (Seg::Index(n), Value::Array(a)) => match a.get(*n) {
                    Some(next) => cur = next,
                    None => {
                        return format!(
                            "no such key ({here} has {} entr{}, from [0])",
                            a.len(),
                            if a.len() == 1 { "y" } else { "ies" }
                        );
                    }
                },
                (Seg::Key(_), Value::Array(_)) => {
                    return format!("no such key ({here} is a list: index it, as {here}[0])");
                }
                (Seg::Index(_), Value::Object(_)) => {
                    return format!("no such key ({here} is an object, not a list)");
                }
                _ => return format!("no such key ({here} is a value, not an object or list)"),
            }
        }
        "no such key".into()
    }

    /// Sets the value at `path` (which exists): in place in a JSON file's text, so the rest
    /// of the file keeps its layout.
    fn set(&mut self, path: &[Seg], new: &Value) -> Result<(), String> {
        if self.file.yaml {
            let mut y: serde_yaml::Value =
                serde_yaml::from_str(&self.text).map_err(|e| e.to_string())?;
            let mut cur = &mut y;
            for seg in path {
                cur = match seg {
                    Seg::Key(k) => cur.get_mut(k.as_str()),
                    Seg::Index(i) => cur.get_mut(*i),
                }
                .ok_or("no such key")?;
            }
            *cur = serde_yaml::to_value(new).map_err(|e| e.to_string())?;
            self.text = serde_yaml::to_string(&y).map_err(|e| e.to_string())?;
        } else {
            let span = self
                .nodes
                .iter()
                .rev()
                .find(|(p, _)| p == path)
                .map(|(_, s)| s.clone())
                .ok_or("no such key")?;
            self.text.replace_range(span, &inline_json(new));
        }
        self.parse()
    }

    fn save(&self) -> Result<(), String> {
        std::fs::write(&self.file.path, &self.text)
            .map_err(|e| format!("{}: {e}", self.file.path.display()))
    }
}

/// The paths of a YAML document's nodes (string keys only), in document order.
fn yaml_paths(v: &serde_yaml::Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>, depth: usize) {
    out.push(path.clone());
    if depth > MAX_NESTING {
        return;
    }
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, x) in m {
                if let Some(k) = k.as_str() {
                    path.push(Seg::Key(k.to_string()));
                    yaml_paths(x, path, out, depth + 1);
                    path.pop();
                }
            }
        }
        serde_yaml::Value::Sequence(s) => {
            for (i, x) in s.iter().enumerate() {
                path.push(Seg::Index(i));
                yaml_paths(x, path, out, depth + 1);
                path.pop();
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Key paths

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn get<'a>(&self, v: &'a Value) -> Option<&'a Value> {
        match self {
            Seg::Key(k) => v.as_object()?.get(k),
            Seg::Index(i) => v.as_array()?.get(*i),
        }
    }
}

/// `workflows[0].args.num_rounds`; a key that is not a plain name is written `["a.b"]`.
fn fmt_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k)
                if !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '@')) =>
            {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Key(k) => {
                s.push('[');
                s.push_str(&Value::String(k.clone()).to_string());
                s.push(']');
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Parses `workflows[0].args.num_rounds` (and `["a.b"]` for a key with a dot).
fn parse_path(s: &str) -> Result<Vec<Seg>, String> {
    let bad = |why: &str| format!("not a key path: {why}");
    let mut out = Vec::new();
    let mut rest = s;
    let mut expect_name = true;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            if let Some(r) = r.strip_prefix('"') {
                // A quoted key: up to the first unescaped quote.
                let mut end = None;
                let mut escaped = false;
                for (i, c) in r.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = Some(i);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let end = end.ok_or_else(|| bad("a quote is not closed"))?;
                let key: String = serde_json::from_str(&format!("\"{}\"", &r[..end]))
                    .map_err(|e| bad(&e.to_string()))?;
                out.push(Seg::Key(key));
                rest = r[end + 1..]
                    .strip_prefix(']')
                    .ok_or_else(|| bad("expected ] after the quoted key"))?;
            } else {
                let end = r.find(']').ok_or_else(|| bad("a [ is not closed"))?;
                let i: usize = r[..end]
                    .trim()
                    .parse()
                    .map_err(|_| bad(&format!("[{}] is not a list index", &r[..end])))?;
                out.push(Seg::Index(i));
                rest = &r[end + 1..];
            }
            expect_name = false;
        } else if let Some(r) = rest.strip_prefix('.') {
            if expect_name {
                return Err(bad("an empty key"));
            }
            rest = r;
            expect_name = true;
            if rest.is_empty() {
                return Err(bad("it ends with '.'"));
            }
        } else {
            if !expect_name {
                return Err(bad("expected '.' or '[' after ']'"));
            }
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let name = &rest[..end];
            if name.contains([']', '"']) {
                return Err(bad(&format!("{name:?}")));
            }
            out.push(Seg::Key(name.to_string()));
            rest = &rest[end..];
            expect_name = false;
        }
    }
    if out.is_empty() {
        return Err(bad("empty"));
    }
    Ok(out)
}

/// Paths of values with their byte ranges in a JSON text.
type Spans = Vec<(Vec<Seg>, Range<usize>)>;

/// Nesting deeper than this is not indexed (serde_json refuses deeper than 128 anyway).
const MAX_NESTING: usize = 128;

/// Every value of a JSON text with its byte range, in document order (the root first, with
/// the empty path). The text is valid JSON: serde_json parsed it.
fn json_spans(text: &str) -> Result<Spans, String> {
    let mut s = Scanner {
        b: text.as_bytes(),
        text,
        pos: 0,
        out: Vec::new(),
    };
    s.value(&mut Vec::new(), 0)?;
    Ok(s.out)
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    pos: usize,
    out: Spans,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn err(&self, what: &str) -> String {
        format!("{what} at byte {}", self.pos)
    }

    /// A string from its opening quote; its range, quotes included.
    fn string(&mut self) -> Result<Range<usize>, String> {
        let start = self.pos;
        self.pos += 1;
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'\\') => self.pos += 2,
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(start..self.pos);
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn value(&mut self, path: &mut Vec<Seg>, depth: usize) -> Result<(), String> {
        if depth > MAX_NESTING {
            return Err(self.err("nested too deep"));
        }
        self.ws();
        let start = self.pos;
        let at = self.out.len();
        self.out.push((path.clone(), start..start));
        match self.peek() {
            Some(b'{') => {
                self.pos += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                } else {
                    loop {
                        self.ws();
                        if self.peek() != Some(b'"') {
                            return Err(self.err("expected a key"));
                        }
                        let r = self.string()?;
                        let key: String =
                            serde_json::from_str(&self.text[r]).map_err(|e| e.to_string())?;
                        self.ws();
                        if self.peek() != Some(b':') {
                            return Err(self.err("expected ':'"));
                        }
                        self.pos += 1;
                        path.push(Seg::Key(key));
                        self.value(path, depth + 1)?;
                        path.pop();
                        self.ws();
                        match self.peek() {
                            Some(b',') => self.pos += 1,
                            Some(b'}') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.err("expected ',' or '}'")),
                        }
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                } else {
                    let mut i = 0;
                    loop {
                        path.push(Seg::Index(i));
                        self.value(path, depth + 1)?;
                        path.pop();
                        i += 1;
                        self.ws();
                        match self.peek() {
                            Some(b',') => self.pos += 1,
                            Some(b']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.err("expected ',' or ']'")),
                        }
                    }
                }
            }
            Some(b'"') => {
                self.string()?;
            }
            Some(_) => {
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.pos += 1;
                }
                if self.pos == start {
                    return Err(self.err("expected a value"));
                }
            }
            None => return Err(self.err("unexpected end")),
        }
        if let Some(node) = self.out.get_mut(at) {
            node.1.end = self.pos;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors, suggestions, tables

/// A [`Job::load`] error with the file named as [`show_variables`] names it (not by the
/// working folder's path).
fn job_error(e: &JobError, root: &Path, files: &[ConfigFile]) -> String {
    let shown = |p: &Path| {
        files
            .iter()
            .find(|f| f.path == p)
            .map(|f| f.shown.clone())
            .or_else(|| p.strip_prefix(root).ok().map(|r| r.display().to_string()))
            .unwrap_or_else(|| p.display().to_string())
    };
    match e {
        JobError::Invalid { file, key, reason } => format!("{}: {key}: {reason}", shown(file)),
        JobError::Io { path, source } => format!("{}: {source}", shown(path)),
        JobError::TooLarge { path, len, limit } => {
            format!("{}: {len} bytes, at most {limit}", shown(path))
        }
    }
}

/// The candidate nearest `given` if it is near enough to be a typo (or one contains the
/// other).
fn suggest<'a>(given: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let given_l = given.to_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let c_l = c.to_lowercase();
        let d = levenshtein(&given_l, &c_l);
        let near = d <= 2 || d * 3 <= given.len().max(c.len());
        let contains = given_l.len() >= 3 && (c_l.contains(&given_l) || given_l.contains(&c_l));
        if (near || contains) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c.to_string())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A plain-text table, columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Submit

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The id the server gave it.
    pub job_id: String,
    /// The job's name.
    pub name: String,
}

/// Signs the job folder with the admin kit's key and submits it to the kit's server, as
/// `flare-node admin --kit <kit> submit <job>` does. The folder is checked and signed before
/// the server is contacted.
///
/// Blocking: the connection runs on a runtime of its own, on a thread of its own, and is
/// closed when this returns. (An admin session's network task lives as long as its runtime,
/// and while it is connected the server refuses another process with the same kit, such as
/// the `flare-node admin … wait` that follows.)
pub fn submit(job_dir: &Path, kit_dir: &Path) -> anyhow::Result<Submitted> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
            let r = rt.block_on(submit_in(job_dir, kit_dir));
            drop(rt);
            r
        })
        .join()
        .unwrap_or_else(|_| bail!("the submission thread failed"))
    })
}

async fn submit_in(job_dir: &Path, kit_dir: &Path) -> anyhow::Result<Submitted> {
    let kit = flare_provision::kit::load_kit(kit_dir, SystemTime::now())
        .with_context(|| format!("admin kit {}", kit_dir.display()))?;
    let bundle = crate::jobpack::pack(job_dir, &kit.identity.signing)
        .with_context(|| format!("job folder {}", job_dir.display()))?;
    drop(kit);
    let session = AdminSession::connect(kit_dir).await?;
    match session.ask(AdminRequest::Submit(bundle)).await? {
        Ok(v) => {
            let job_id = v["job_id"]
                .as_str()
                .with_context(|| format!("the server's answer has no job id: {v}"))?
                .to_string();
            let name = v["name"].as_str().unwrap_or_default().to_string();
            Ok(Submitted { job_id, name })
        }
        Err(why) => bail!("the server refused {}: {why}", job_dir.display()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn json_doc(text: &str) -> Doc {
        let mut doc = Doc {
            file: ConfigFile {
                path: PathBuf::from("config_fed_server.json"),
                shown: "config_fed_server.json".into(),
                yaml: false,
            },
            text: text.into(),
            value: Value::Null,
            nodes: Vec::new(),
        };
        doc.parse().unwrap();
        doc
    }

    #[test]
    fn paths_round_trip() {
        for p in [
            "workflows[0].args.num_rounds",
            "deploy_map.app",
            "a[1][2].b",
            r#"deploy_map["eu.site-2"]"#,
        ] {
            assert_eq!(fmt_path(&parse_path(p).unwrap()), p);
        }
        for bad in ["a..b", "a.", "[x]", "a[0", "a]b", r#"["a"#, ".a"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spans_follow_the_text() {
        let text = r#"{ "a": [1, "x\"y", {"b": null}], "c": { }, "d": -1.5e3 }"#;
        let spans = json_spans(text).unwrap();
        let at = |p: &str| {
            let path = parse_path(p).unwrap();
            let (_, r) = spans.iter().find(|(q, _)| *q == path).unwrap();
            &text[r.clone()]
        };
        assert_eq!(at("a[1]"), r#""x\"y""#);
        assert_eq!(at("a[2].b"), "null");
        assert_eq!(at("c"), "{ }");
        assert_eq!(at("d"), "-1.5e3");
        assert_eq!(at("a"), r#"[1, "x\"y", {"b": null}]"#);
    }

    #[test]
    fn set_keeps_the_layout() {
        let text = "{\n  \"w\": [ { \"args\": { \"num_rounds\": 5, \"x\": 1 } } ],\n  \"tasks\": [\"a\"]\n}\n";
        let mut doc = json_doc(text);
        let p = doc.resolve("num_rounds").unwrap();
        doc.set(&p, &Value::from(2)).unwrap();
        let p = doc.resolve("tasks").unwrap();
        doc.set(&p, &parse_value(r#"["a","b"]"#)).unwrap();
        assert_eq!(
            doc.text,
            "{\n  \"w\": [ { \"args\": { \"num_rounds\": 2, \"x\": 1 } } ],\n  \"tasks\": [\"a\", \"b\"]\n}\n"
        );
    }

    #[test]
    fn keys_resolve_or_say_why() {
        let doc = json_doc(
            r#"{"workflows": [{"name": "A", "args": {"num_rounds": 5, "progress_timeout": 1}},
                              {"name": "B", "args": {"progress_timeout": 2}}]}"#,
        );
        assert_eq!(
            fmt_path(&doc.resolve("num_rounds").unwrap()),
            "workflows[0].args.num_rounds"
        );
        let e = doc.resolve("workflows[0].args.num_roundz").unwrap_err();
        assert_eq!(e, "no such key (did you mean num_rounds?)");
        let e = doc.resolve("num_roundz").unwrap_err();
        assert_eq!(e, "no such key (did you mean num_rounds?)");
        let e = doc.resolve("progress_timeout").unwrap_err();
        assert!(e.contains("workflows[0].args.progress_timeout"), "{e}");
        assert!(e.contains("workflows[1].args.progress_timeout"), "{e}");
        assert!(
            doc.resolve("workflows[2].args")
                .unwrap_err()
                .contains("2 entries")
        );
        assert!(
            doc.resolve("workflows.args")
                .unwrap_err()
                .contains("is a list")
        );
        assert_eq!(
            component_of(
                &doc.value,
                &parse_path("workflows[1].args.progress_timeout").unwrap()
            ),
            Some("B".into())
        );
    }

    #[test]
    fn values_are_json_when_they_parse() {
        assert_eq!(parse_value("3"), Value::from(3));
        assert_eq!(parse_value("true"), Value::from(true));
        assert_eq!(parse_value("random"), Value::from("random"));
        assert_eq!(parse_value(r#""5""#), Value::from("5"));
        assert_eq!(parse_value("[1, 2]"), serde_json::json!([1, 2]));
        assert_eq!(parse_value(""), Value::from(""));
    }

    #[test]
    fn the_command_line_groups_each_file_with_its_variables() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: JobCommand,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "flare-node",
            "create",
            "-j",
            "jobs/a",
            "-f",
            "config_fed_server.json",
            "num_rounds=3",
            "min_clients=2",
            "-f",
            "config_fed_client.json",
            "epochs=1",
            "--script",
            "t.py",
            "--script-args",
            "--epochs 2",
        ])
        .unwrap();
        let JobCommand::Create {
            job,
            template,
            config,
            script_args,
            ..
        } = cli.cmd
        else {
            panic!("not create");
        };
        assert_eq!(job, PathBuf::from("jobs/a"));
        assert_eq!(template, DEFAULT_TEMPLATE);
        assert_eq!(
            group_edits(&config).unwrap(),
            [
                ConfigEdits {
                    file: "config_fed_server.json".into(),
                    sets: vec!["num_rounds=3".into(), "min_clients=2".into()],
                },
                ConfigEdits {
                    file: "config_fed_client.json".into(),
                    sets: vec!["epochs=1".into()],
                },
            ]
        );
        assert!(group_edits(&["num_rounds=3".into()]).is_err());
        assert_eq!(script_args.as_deref(), Some("--epochs 2"));
        for flare_style in ["list_templates", "show_variables"] {
            let args: &[&str] = if flare_style == "list_templates" {
                &["flare-node", flare_style]
            } else {
                &["flare-node", flare_style, "-j", "x"]
            };
            assert!(
                <Cli as clap::Parser>::try_parse_from(args).is_ok(),
                "{flare_style}"
            );
        }
    }

    #[test]
    fn suggestions() {
        let keys = ["num_rounds", "min_clients", "task_timeout"];
        assert_eq!(
            suggest("num_roundz", keys.into_iter()),
            Some("num_rounds".into())
        );
        assert_eq!(
            suggest("rounds", keys.into_iter()),
            Some("num_rounds".into())
        );
        assert_eq!(suggest("zzz", keys.into_iter()), None);
    }
}
