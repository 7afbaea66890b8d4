//! `memtrack live` and `memtrack run --live`: the terminal view of a capture being written.
//! The figures come from `memtrack_reader::Follower` (which reads only what was appended since
//! the last refresh); this module draws them with ratatui and handles the keys.

use anyhow::{Context, Result};
use memtrack_reader::report::ReportOptions;
use memtrack_reader::{human_bytes, Follower, GroupBy, Horizon, LiveRow, Measure, Symbolizer};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Cell, Chart, Dataset, GraphType, Paragraph, Row, Table};
use ratatui::Frame;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How often the view reads what the capture gained and redraws its figures (the cost is what
/// was read, however often: a short interval only brings the figures sooner).
const POLL: Duration = Duration::from_millis(250);
/// How often the table of locations is computed again (it looks at every stack).
const REFRESH: Duration = Duration::from_secs(1);
/// File bytes read per step while catching up with a large capture (the view stays responsive).
const CATCH_UP_BYTES: usize = 8 << 20;
/// The time span of the chart: the last this many seconds.
const CHART_SECONDS: u64 = 300;

/// The command `memtrack run --live` started.
pub(crate) struct Running<'a> {
    pub(crate) child: &'a mut Child,
    /// Where its output goes.
    pub(crate) log: &'a Path,
    /// Its status once it ended.
    pub(crate) status: Option<ExitStatus>,
}

/// Follows `file` on the terminal until q (or Ctrl-C without a command). With a command, Ctrl-C
/// is sent to it (as the terminal would without the view) and the view stays until q.
pub(crate) fn live(
    options: &ReportOptions,
    file: &Path,
    mut command: Option<&mut Running>,
) -> Result<()> {
    if command.is_none() {
        // Fail before the terminal is taken over; a capture whose header is not written yet is
        // waited for.
        match Follower::open(file) {
            Err(memtrack_reader::ReadError::TruncatedHeader { .. }) | Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        if memtrack_reader::Capture::open(file).is_ok_and(|c| c.aggregated()) {
            anyhow::bail!(
                "{}: an aggregated capture (memtrack run --aggregate) has no events to follow; \
                 `memtrack summary {}` shows its latest checkpoint",
                file.display(),
                file.display()
            );
        }
    }
    let mut view = View::new(options, file);
    let mut term = Screen::take()?;
    loop {
        if let Some(c) = command.as_deref_mut() {
            if c.status.is_none() {
                c.status = c.child.try_wait().context("waiting for the command")?;
            }
        }
        view.refresh(command.as_deref());
        term.0.draw(|f| view.draw(f, command.as_deref()))?;
        // Keys until the next refresh (at once while catching up with a large capture).
        let until = view.last_poll + if view.behind { Duration::ZERO } else { POLL };
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if !event::poll(left)? {
                break;
            }
            let Event::Key(k) = event::read()? else {
                // A resize: redraw now.
                term.0.draw(|f| view.draw(f, command.as_deref()))?;
                continue;
            };
            if k.kind != KeyEventKind::Press {
                continue;
            }
            let ctrl_c =
                k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
            match k.code {
                _ if ctrl_c => match command.as_deref_mut() {
                    Some(c) if c.status.is_none() => {
                        // What the terminal does with Ctrl-C when it is not in raw mode: SIGINT to
                        // the foreground process group (memtrack ignores it, the command gets it).
                        // SAFETY: kill has no memory effects.
                        unsafe { libc::kill(0, libc::SIGINT) };
                        view.note = Some("Ctrl-C sent to the command; q leaves the view".into());
                    }
                    _ => return Ok(()),
                },
                KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('l') => view.measure = Measure::Live,
                KeyCode::Char('a') => view.measure = Measure::AllocatedSinceStart,
                KeyCode::Tab => {
                    view.measure = match view.measure {
                        Measure::Live => Measure::AllocatedSinceStart,
                        Measure::AllocatedSinceStart => Measure::Live,
                    }
                }
                KeyCode::Char('b') => {
                    view.by = match view.by {
                        GroupBy::Function => GroupBy::Line,
                        _ => GroupBy::Function,
                    }
                }
                KeyCode::Char('f') => view.by = GroupBy::Function,
                KeyCode::Char('n') => view.by = GroupBy::Line,
                _ => continue,
            }
            view.rows_for_screen();
            term.0.draw(|f| view.draw(f, command.as_deref()))?;
        }
    }
}

/// The terminal in raw mode on the alternate screen, given back on drop (also on an error or
/// a panic: ratatui's hook restores it first).
struct Screen(ratatui::DefaultTerminal);

impl Screen {
    fn take() -> Result<Screen> {
        Ok(Screen(
            ratatui::try_init().context("cannot take over the terminal")?,
        ))
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// What the view shows and how.
struct View<'a> {
    options: &'a ReportOptions,
    file: PathBuf,
    follower: Option<Follower>,
    /// Why there is no follower yet (the capture is not there, or has no header yet).
    waiting: Option<String>,
    sym: Option<Symbolizer>,
    /// Module records the symbolizer was made with.
    modules: usize,
    measure: Measure,
    by: GroupBy,
    rows: Vec<LiveRow>,
    /// Rows the table has room for.
    room: usize,
    last_poll: Instant,
    /// When the table was last computed (None: never).
    last_table: Option<Instant>,
    /// The file holds more than the last read took.
    behind: bool,
    /// The traced process is gone without finishing its capture.
    gone: bool,
    /// The start that growth counts from is set (once what the capture held is read).
    started: bool,
    /// What the reads since the last table cost (bytes read, this thread's CPU time), and that
    /// for the second before (shown).
    acc: (u64, Duration),
    cost: (u64, Duration),
    note: Option<String>,
}

impl<'a> View<'a> {
    fn new(options: &'a ReportOptions, file: &Path) -> View<'a> {
        View {
            options,
            file: file.to_path_buf(),
            follower: None,
            waiting: None,
            sym: None,
            modules: 0,
            measure: Measure::Live,
            by: GroupBy::Function,
            rows: Vec::new(),
            room: 20,
            last_poll: Instant::now(),
            last_table: None,
            behind: false,
            gone: false,
            started: false,
            acc: (0, Duration::ZERO),
            cost: (0, Duration::ZERO),
            note: None,
        }
    }

    /// Reads what the capture gained and recomputes the table.
    fn refresh(&mut self, command: Option<&Running>) {
        let t0 = Instant::now();
        let cpu0 = thread_cpu();
        self.last_poll = t0;
        if self.follower.is_none() {
            match Follower::open(&self.file) {
                Ok(f) => {
                    self.follower = Some(f);
                    self.waiting = None;
                }
                Err(e) => {
                    self.waiting = Some(match command {
                        Some(_) => "waiting for the command to start its capture".into(),
                        None => format!("{e}"),
                    });
                    return;
                }
            }
        }
        let Some(f) = self.follower.as_mut() else {
            return;
        };
        let command_ended = command.is_some_and(|c| c.status.is_some());
        let horizon = if command_ended || self.gone {
            Horizon::All
        } else {
            Horizon::Safe
        };
        match f.poll(horizon, CATCH_UP_BYTES) {
            Ok(p) => {
                self.behind = p.behind;
                // The start growth counts from: once the existing part has been read.
                if !self.started && !p.behind {
                    f.mark_start();
                    self.started = true;
                }
                if p.bytes == 0
                    && !f.finished()
                    && !self.gone
                    && command.is_none()
                    && !memtrack_reader::report::being_written(f.capture())
                {
                    self.gone = true;
                }
                self.acc.0 += p.bytes;
            }
            Err(e) => self.note = Some(format!("{e}")),
        }
        let f = self.follower.as_ref().expect("opened above");
        let cap = f.capture();
        if self.sym.is_none() || cap.modules.len() != self.modules {
            self.sym = Some(self.options.symbolizer(cap));
            self.modules = cap.modules.len();
        }
        if let Some(sym) = self.sym.as_mut() {
            sym.update_python_code(cap);
        }
        if self.last_table.is_none_or(|t| t.elapsed() >= REFRESH) {
            self.rows_for_screen();
            self.last_table = Some(t0);
            self.acc.1 += thread_cpu().saturating_sub(cpu0);
            self.cost = std::mem::take(&mut self.acc);
        } else {
            self.acc.1 += thread_cpu().saturating_sub(cpu0);
        }
    }

    /// The table's rows for the current measure and grouping.
    fn rows_for_screen(&mut self) {
        if let (Some(f), Some(sym)) = (&self.follower, self.sym.as_mut()) {
            self.rows = f.table(sym, self.measure, self.by, self.room.max(1));
        }
    }

    fn draw(&mut self, frame: &mut Frame, command: Option<&Running>) {
        let [title, figures, chart, table, keys] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(2 + command.is_some() as u16),
            Constraint::Percentage(40),
            Constraint::Min(5),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        self.room = table.height.saturating_sub(3) as usize;
        frame.render_widget(Paragraph::new(self.title(command)), title);
        let Some(f) = &self.follower else {
            let why = self.waiting.clone().unwrap_or_default();
            frame.render_widget(Paragraph::new(why), figures);
            frame.render_widget(Paragraph::new(keys_line()), keys);
            return;
        };
        let mut lines = self.figures(f);
        if let Some(c) = command {
            lines.push(Line::from(format!(
                "the command's output goes to {}",
                c.log.display()
            )));
        }
        frame.render_widget(Paragraph::new(lines), figures);
        draw_chart(frame, chart, f, self.gone || f.finished());
        self.draw_table(frame, table);
        let mut line = keys_line();
        if let Some(n) = &self.note {
            line.push_span(Span::styled(
                format!("   {n}"),
                Style::new().fg(Color::Yellow),
            ));
        } else {
            line.push_span(Span::styled(
                format!(
                    "   last second: read {}, {} ms of CPU",
                    human_bytes(self.cost.0),
                    self.cost.1.as_millis()
                ),
                Style::new().fg(Color::DarkGray),
            ));
        }
        frame.render_widget(Paragraph::new(line), keys);
    }

    fn title(&self, command: Option<&Running>) -> Line<'static> {
        let bold = Style::new().add_modifier(Modifier::BOLD);
        let mut spans = vec![Span::styled("memtrack live  ", bold)];
        let Some(f) = &self.follower else {
            spans.push(Span::raw(self.file.display().to_string()));
            return Line::from(spans);
        };
        let state = match command.and_then(|c| c.status) {
            _ if self.behind => Span::styled(
                format!("reading the capture: {} so far", human_bytes(f.offset())),
                Style::new().fg(Color::Yellow),
            ),
            Some(st) => Span::styled(
                format!("ended ({}); the view shows its last state", describe(st)),
                Style::new().fg(Color::Green).add_modifier(Modifier::BOLD),
            ),
            None if f.finished() => Span::styled(
                format!(
                    "ended after {:.1} s; the view shows its last state",
                    f.seconds(f.replay().last_time)
                ),
                Style::new().fg(Color::Green).add_modifier(Modifier::BOLD),
            ),
            None if self.gone => Span::styled(
                "the process is gone without finishing its capture (killed?)",
                Style::new().fg(Color::Red),
            ),
            None => Span::styled(
                format!("running {}", clock(f.seconds(f.clock_now()))),
                Style::new().fg(Color::Cyan),
            ),
        };
        spans.push(state);
        // The command last: a long one is cut at the screen's edge, not the state.
        let cap = f.capture();
        spans.push(Span::raw(format!(
            "   [pid {}] {}",
            cap.header.pid,
            memtrack_reader::shell_command(&cap.last_image().argv),
        )));
        Line::from(spans)
    }

    fn figures(&self, f: &Follower) -> Vec<Line<'static>> {
        let r = f.replay();
        let rss = f.rss().last().map(|p| human_bytes(p.last));
        let growth = f.growth();
        let sign = if growth < 0 { "-" } else { "+" };
        let (since_bytes, since_count) = f.allocated_since_start();
        let bold = Style::new().add_modifier(Modifier::BOLD);
        vec![
            Line::from(vec![
                Span::raw("heap "),
                Span::styled(human_bytes(r.live_bytes), bold.fg(Color::Cyan)),
                Span::raw(format!(
                    " in {} blocks   peak {} at {:.1} s   RSS ",
                    memtrack_reader::grouped(r.live_allocations()),
                    human_bytes(r.peak_bytes),
                    f.seconds(r.peak_time)
                )),
                Span::styled(rss.unwrap_or_else(|| "-".into()), bold.fg(Color::Magenta)),
                Span::raw(match f.capture().threads {
                    1 => "   1 thread".to_string(),
                    n => format!("   {n} threads"),
                }),
            ]),
            Line::from(vec![
                Span::raw("since the view started: heap "),
                Span::styled(
                    format!("{sign}{}", human_bytes(growth.unsigned_abs())),
                    bold.fg(if growth > 0 { Color::Red } else { Color::Green }),
                ),
                Span::raw(format!(
                    ", {} allocated in {} allocations",
                    human_bytes(since_bytes),
                    memtrack_reader::grouped(since_count)
                )),
                // Never expected: the tracker writes within 250 ms, the view waits 750.
                Span::styled(
                    match f.late_events {
                        0 => String::new(),
                        n => format!(
                            "   ({} events came late, applied out of order)",
                            memtrack_reader::grouped(n)
                        ),
                    },
                    Style::new().fg(Color::Yellow),
                ),
            ]),
        ]
    }

    fn draw_table(&self, frame: &mut Frame, area: Rect) {
        let (what, first) = match self.measure {
            Measure::Live => ("live bytes", "Live"),
            Measure::AllocatedSinceStart => ("bytes allocated since the view started", "Allocated"),
        };
        let by = match self.by {
            GroupBy::Line => "by line",
            _ => "by function",
        };
        let header = match self.measure {
            Measure::Live => Row::new(["Live", "Growth", "Count", "Location"]),
            Measure::AllocatedSinceStart => Row::new([first, "", "Count", "Location"]),
        }
        .style(Style::new().add_modifier(Modifier::BOLD));
        let rows = self.rows.iter().map(|r| {
            let location = r.label.clone();
            let growth = match r.growth {
                Some(g) if g > 0 => Cell::from(format!("+{}", human_bytes(g as u64)))
                    .style(Style::new().fg(Color::Red)),
                Some(g) if g < 0 => Cell::from(format!("-{}", human_bytes(g.unsigned_abs())))
                    .style(Style::new().fg(Color::Green)),
                Some(_) => Cell::from("0"),
                None => Cell::from(""),
            };
            Row::new([
                Cell::from(human_bytes(r.row.total_bytes)),
                growth,
                Cell::from(memtrack_reader::grouped(r.row.count)),
                Cell::from(location),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(11),
                Constraint::Length(12),
                Constraint::Length(11),
                Constraint::Fill(1),
            ],
        )
        .header(header)
        .block(Block::bordered().title(format!(" Top locations by {what}, {by} ")));
        frame.render_widget(table, area);
    }
}

/// Heap and RSS over the last minutes.
fn draw_chart(frame: &mut Frame, area: Rect, f: &Follower, ended: bool) {
    let now = if ended {
        f.seconds(f.replay().last_time.max(f.capture().last_chunk_time)) as u64
    } else {
        f.seconds(f.clock_now()) as u64
    };
    let from = now.saturating_sub(CHART_SECONDS);
    let points = |h: &memtrack_reader::History| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = h
            .points()
            .filter(|p| p.second >= from)
            .map(|p| (p.second as f64, p.max as f64))
            .collect();
        // The line goes on to now at the last value.
        if let Some(p) = h.last() {
            if p.second < now {
                v.push((now as f64, p.last as f64));
            }
        }
        v
    };
    let heap = points(f.heap());
    let rss = points(f.rss());
    let top = heap.iter().chain(&rss).map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let span = (now - from).max(1);
    let datasets = vec![
        Dataset::default()
            .name(format!("heap {}", human_bytes(f.replay().live_bytes)))
            .marker(symbols::Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::new().fg(Color::Cyan))
            .data(&heap),
        Dataset::default()
            .name(match f.rss().last() {
                Some(p) => format!("RSS {}", human_bytes(p.last)),
                None => "RSS (no samples)".into(),
            })
            .marker(symbols::Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::new().fg(Color::Magenta))
            .data(&rss),
    ];
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(format!(" Last {} ", clock(span as f64))))
        .x_axis(
            Axis::default()
                .bounds([from as f64, now as f64])
                .labels([clock(from as f64), clock(now as f64)]),
        )
        .y_axis(
            Axis::default()
                .bounds([0.0, top])
                .labels(["0".to_string(), human_bytes(top as u64)]),
        )
        .legend_position(Some(ratatui::widgets::LegendPosition::TopLeft))
        .hidden_legend_constraints((Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)));
    frame.render_widget(chart, area);
}

fn keys_line() -> Line<'static> {
    let key = Style::new().add_modifier(Modifier::BOLD).fg(Color::Yellow);
    Line::from(vec![
        Span::styled("l", key),
        Span::raw(" live  "),
        Span::styled("a", key),
        Span::raw(" allocated since start  "),
        Span::styled("b", key),
        Span::raw(" by function/line  "),
        Span::styled("q", key),
        Span::raw(" quit"),
    ])
}

/// The CPU time of the calling thread (what a refresh costs, whatever else the machine runs).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `12:03` or `1:02:03` from seconds.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// `exit code 3`, `killed by signal 9`.
pub(crate) fn describe(st: ExitStatus) -> String {
    match (
        st.code(),
        std::os::unix::process::ExitStatusExt::signal(&st),
    ) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}
