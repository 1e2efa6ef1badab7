//! The BPF filesystem: where the agent pins its maps and its per-pod links so that they outlive
//! the process.
//!
//! Pinned links keep a pod captured while no agent runs: after a crash its outbound connects
//! still go to the (now closed) in-pod listener and are refused, instead of leaving the mesh.
//! A successor agent finds the pins, swaps its own programs into the links atomically
//! (`BPF_LINK_UPDATE`: no instant without a program attached) and reuses the pinned maps.
//!
//! aya can pin links and maps but not update a pinned link it did not create, so the two
//! syscalls for that live here.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context as _, anyhow};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Mounts bpffs at `mount_point` unless something is mounted there already, then creates
/// `dir` (which must lie under it).
pub fn ensure_dir(mount_point: &Path, dir: &Path) -> anyhow::Result<()> {
    if !is_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point)
            .with_context(|| format!("creating {}", mount_point.display()))?;
        let target = c_path(mount_point)?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mounting bpffs at {}", mount_point.display()));
        }
        tracing::info!(path = %mount_point.display(), "mounted the BPF filesystem");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = c_path(path) else { return false };
    // SAFETY: statfs fills a zeroed struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| anyhow!("path {} contains a NUL byte", path.display()))
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn open_pinned(path: &Path) -> anyhow::Result<OwnedFd> {
    let c = c_path(path)?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags, path_fd; all else zero
    // (the kernel rejects stray bytes after the last field: no struct with padding here).
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd =
        bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening pin {}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of an existing link (`BPF_LINK_UPDATE`), atomically for the hook.
pub fn update_link(link: &impl AsRawFd, program: &impl AsRawFd) -> anyhow::Result<()> {
    // bpf_attr for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd (u32 each).
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: the bpf syscall reads (and may write) at most `attr.len()` bytes of attr.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
