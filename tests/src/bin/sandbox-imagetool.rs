//! `sandbox-imagetool`: builds OCI layers from directory trees and pushes images to a registry over
//! plain HTTP. `scripts/test-images` uses it to fill the test registry; the library behind it is
//! `sandbox_tests::oci`.
//!
//! ```text
//! sandbox-imagetool layer-from-dir DIR --out FILE [--compression gzip|zstd|none] [--zero-mtimes] [--xattrs]
//! sandbox-imagetool diff-layer LOWER UPPER --out FILE [--compression ...] [--zero-mtimes] [--xattrs]
//! sandbox-imagetool push --registry HOST:PORT --repo NAME --tag TAG --layer FILE... \
//!     [--config-json JSON|@FILE] [--platform OS/ARCH[/VARIANT]] [--extra-platform OS/ARCH[/VARIANT]]... \
//!     [--format oci|docker] [--created RFC3339] [--history TEXT]...
//! ```
//!
//! `layer-from-dir` and `diff-layer` write the compressed layer to FILE and print one JSON line:
//! `{"digest", "diff_id", "size", "media_type", "compression", "entries", "whiteouts"}`.
//!
//! `push` takes layer files as written (compression recognised by magic bytes, diff ids computed),
//! bottom first, and `--config-json` as the `config` object of an image config (`Env`, `Cmd`,
//! `Entrypoint`, `WorkingDir`, `User`, anything else as it is). The platform defaults to this
//! machine's. With `--extra-platform`, the tag names an index (manifest list) of the real image plus,
//! for each extra platform, a placeholder image whose layer holds only `/PLACEHOLDER.txt`; without
//! it, the tag names the manifest itself. Blobs the repository already has are not sent again, so
//! pushing the same content twice is harmless. It prints one JSON line:
//! `{"repo", "tag", "digest", "media_type", "manifests": [{"platform", "digest"}]}`.

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use sandbox_tests::oci::{
    Compression, DirOptions, Format, Image, ImageConfig, Layer, LayerBuilder, Mtimes, Platform,
    Registry,
};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "sandbox-imagetool",
    about = "Build OCI layers and push images to a registry (plain HTTP)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A layer of everything under DIR (sorted, numeric owners, hard links kept; DIR itself not
    /// included).
    LayerFromDir {
        /// The tree.
        dir: PathBuf,
        #[command(flatten)]
        out: LayerOut,
    },
    /// A layer of what turns LOWER into UPPER: added and changed entries, `.wh.` whiteouts for
    /// deletions.
    DiffLayer {
        /// The tree before.
        lower: PathBuf,
        /// The tree after.
        upper: PathBuf,
        #[command(flatten)]
        out: LayerOut,
    },
    /// Push an image (and placeholder images for extra platforms, under an index).
    Push(PushArgs),
}

#[derive(Args, Debug)]
struct LayerOut {
    /// Where the compressed layer goes (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// none, gzip or zstd.
    #[arg(long, default_value = "gzip")]
    compression: Compression,
    /// Write mtime 0 everywhere instead of the files' own.
    #[arg(long)]
    zero_mtimes: bool,
    /// Read and write extended attributes (PAX SCHILY.xattr.*).
    #[arg(long)]
    xattrs: bool,
}

impl LayerOut {
    fn options(&self) -> DirOptions {
        DirOptions {
            mtimes: if self.zero_mtimes {
                Mtimes::Zero
            } else {
                Mtimes::Keep
            },
            xattrs: self.xattrs,
        }
    }
}

#[derive(Args, Debug)]
struct PushArgs {
    /// host:port of the registry (plain HTTP).
    #[arg(long)]
    registry: String,
    /// Repository, e.g. library/python.
    #[arg(long)]
    repo: String,
    /// Tag, e.g. 3.11.
    #[arg(long)]
    tag: String,
    /// A layer blob, bottom first; repeat for each layer.
    #[arg(long = "layer", required = true)]
    layers: Vec<PathBuf>,
    /// The config's `config` object, inline or @FILE.
    #[arg(long)]
    config_json: Option<String>,
    /// The image's platform (default: this machine's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Add a placeholder image for this platform and push an index; repeatable.
    #[arg(long = "extra-platform")]
    extra_platforms: Vec<Platform>,
    /// oci or docker media types.
    #[arg(long, default_value = "oci")]
    format: Format,
    /// The config's `created`.
    #[arg(long, default_value = sandbox_tests::oci::EPOCH)]
    created: String,
    /// `created_by` of each layer's history entry, in layer order; repeatable.
    #[arg(long = "history")]
    history: Vec<String>,
}

fn write_layer(
    layer: &Layer,
    out: &std::path::Path,
    entries: usize,
    whiteouts: usize,
) -> anyhow::Result<()> {
    let tmp = out.with_file_name(format!(
        ".{}.tmp{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("layer"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&layer.bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    let j = json!({
        "digest": layer.digest,
        "diff_id": layer.diff_id,
        "size": layer.size,
        "media_type": layer.media_type,
        "compression": layer.compression.to_string(),
        "entries": entries,
        "whiteouts": whiteouts,
    });
    println!("{j}");
    Ok(())
}

fn push(a: &PushArgs) -> anyhow::Result<()> {
    let mut layers = Vec::new();
    for p in &a.layers {
        let bytes = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        layers.push(
            Layer::from_blob(bytes).with_context(|| format!("decompressing {}", p.display()))?,
        );
    }
    let platform = a.platform.clone().unwrap_or_else(Platform::host);
    let mut config = ImageConfig::new(platform.clone());
    config.created = a.created.clone();
    config.history = a.history.clone();
    if let Some(c) = &a.config_json {
        let text = match c.strip_prefix('@') {
            Some(f) => fs::read_to_string(f).with_context(|| format!("reading {f}"))?,
            None => c.clone(),
        };
        let v: Value = serde_json::from_str(&text).context("--config-json")?;
        let Some(obj) = v.as_object() else {
            bail!("--config-json must be a JSON object");
        };
        config.merge_config_json(obj)?;
    }
    let mut image = Image::new(config, layers);
    image.format = a.format;
    let reg = Registry::new(&a.registry);
    let (digest, media_type, manifests) = if a.extra_platforms.is_empty() {
        let d = reg.push_image(&a.repo, &a.tag, &image)?;
        let m = vec![json!({"platform": platform.to_string(), "digest": d})];
        (d, a.format.manifest_media_type(), m)
    } else {
        let compression = image
            .layers
            .first()
            .map_or(Compression::Gzip, |l| l.compression);
        let mut images = vec![image];
        for p in &a.extra_platforms {
            if *p == platform {
                bail!("--extra-platform {p} is the image's own platform");
            }
            let mut ph = Image::placeholder(p.clone(), compression)?;
            ph.format = a.format;
            images.push(ph);
        }
        let d = reg.push_index(&a.repo, &a.tag, a.format, &images)?;
        let m = images
            .iter()
            .map(|i| json!({"platform": i.config.platform.to_string(), "digest": i.docs().descriptor.digest}))
            .collect();
        (d, a.format.index_media_type(), m)
    };
    let j = json!({
        "repo": a.repo,
        "tag": a.tag,
        "digest": digest,
        "media_type": media_type,
        "manifests": manifests,
    });
    println!("{j}");
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::LayerFromDir { dir, out } => {
            let mut b = LayerBuilder::new();
            b.append_dir_tree(&dir, &out.options())?;
            let n = b.len();
            let layer = b.finish(out.compression)?;
            write_layer(&layer, &out.out, n, 0)
        }
        Cmd::DiffLayer { lower, upper, out } => {
            let mut b = LayerBuilder::new();
            let (n, w) = b.append_tree_diff(&lower, &upper, &out.options())?;
            let layer = b.finish(out.compression)?;
            write_layer(&layer, &out.out, n, w)
        }
        Cmd::Push(a) => push(&a),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox-imagetool: {e:#}");
            ExitCode::FAILURE
        }
    }
}
