//! The progress bar of long reads, on standard error.

use memtrack_reader::Capture;

/// A progress bar on stderr for long reads: only when stderr is a terminal, and only once the
/// read has taken a second (`MEMTRACK_PROGRESS_AFTER_MS` changes that, for tests). Dropping it
/// clears the line.
pub(crate) struct Progress {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn start(cap: &Capture, quiet: bool) -> Progress {
        use std::io::IsTerminal;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if quiet || !std::io::stderr().is_terminal() || cap.chunks.is_empty() {
            return Progress { done, thread: None };
        }
        let after = std::env::var("MEMTRACK_PROGRESS_AFTER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let (d, counter, total) = (done.clone(), cap.progress(), cap.chunks.len());
        let name = cap.path().display().to_string();
        let draw = move |n: usize| {
            let filled = n * 30 / total;
            eprint!(
                "\rreading {name} [{}{}] {:>3}%",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                n * 100 / total
            );
        };
        // With no delay the bar is drawn at once, whatever the scheduler does with the thread.
        let mut drawn = after == 0;
        if drawn {
            draw(0);
        }
        let thread = std::thread::spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let start = std::time::Instant::now();
            let mut first = true;
            while !d.load(Relaxed) {
                if !first {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                first = false;
                if start.elapsed().as_millis() < after {
                    continue;
                }
                draw(counter.load(Relaxed).min(total));
                drawn = true;
            }
            if drawn {
                eprint!("\r\x1b[K");
            }
        });
        Progress {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
