//! The results table: one Markdown table per section, medians with their spread and the
//! bulkhead/qsd and bulkhead/nbdkit ratios, so the same text reads well in a terminal and in
//! `design/data-path.md`.
//!
//! Runs in the benchmark harness only; pure formatting.

use crate::stats::Summary;

/// One metric across the servers.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured, with its unit.
    pub metric: String,
    /// qsd's samples.
    pub qsd: Option<Summary>,
    /// bulkhead's samples.
    pub bulkhead: Option<Summary>,
    /// nbdkit's samples, when nbdkit has the metric.
    pub nbdkit: Option<Summary>,
}

/// A titled group of rows (one backing, or the control plane).
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// Heading.
    pub title: String,
    /// Whether nbdkit is compared here (its two columns are left out otherwise).
    pub nbdkit: bool,
    /// Rows in order.
    pub rows: Vec<Row>,
}

/// A number with as many decimals as its size deserves: 12345, 45.3, 0.82.
pub fn format_number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `median (min-max)`, or `-` when there is nothing.
pub fn format_cell(s: Option<&Summary>) -> String {
    match s {
        None => "-".to_owned(),
        Some(s) if s.count == 1 || s.min == s.max => format_number(s.median),
        Some(s) => format!(
            "{} ({}-{})",
            format_number(s.median),
            format_number(s.min),
            format_number(s.max)
        ),
    }
}

/// bulkhead's median over qsd's, or `-` when either is missing or qsd's is zero.
pub fn format_ratio(row: &Row) -> String {
    ratio(row.bulkhead.as_ref(), row.qsd.as_ref())
}

/// bulkhead's median over nbdkit's, or `-`.
pub fn format_nbdkit_ratio(row: &Row) -> String {
    ratio(row.bulkhead.as_ref(), row.nbdkit.as_ref())
}

fn ratio(ours: Option<&Summary>, theirs: Option<&Summary>) -> String {
    match (ours, theirs) {
        // Three decimals below 0.1, so a 250x gap does not print as 0.00.
        (Some(b), Some(q)) if q.median != 0.0 => {
            let r = b.median / q.median;
            if r.abs() < 0.1 {
                format!("{r:.3}")
            } else {
                format!("{r:.2}")
            }
        }
        _ => "-".to_owned(),
    }
}

const HEADER: [&str; 6] = [
    "metric",
    "qsd",
    "bulkhead",
    "bulkhead/qsd",
    "nbdkit",
    "bulkhead/nbdkit",
];

/// Renders every section as a heading line and an aligned Markdown table.
pub fn render(sections: &[Section]) -> String {
    let mut out = String::new();
    for (i, section) in sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("**{}**\n\n", section.title));
        let columns = if section.nbdkit { 6 } else { 4 };
        let mut cells: Vec<Vec<String>> =
            vec![HEADER[..columns].iter().map(|h| (*h).to_owned()).collect()];
        for row in &section.rows {
            let mut line = vec![
                row.metric.clone(),
                format_cell(row.qsd.as_ref()),
                format_cell(row.bulkhead.as_ref()),
                format_ratio(row),
                format_cell(row.nbdkit.as_ref()),
                format_nbdkit_ratio(row),
            ];
            line.truncate(columns);
            cells.push(line);
        }
        let mut widths = vec![0usize; columns];
        for line in &cells {
            for (w, c) in widths.iter_mut().zip(line) {
                *w = (*w).max(c.chars().count());
            }
        }
        for (n, line) in cells.iter().enumerate() {
            out.push('|');
            for (col, (w, c)) in widths.iter().zip(line).enumerate() {
                let pad = w - c.chars().count();
                // Metric names left-aligned, numbers right-aligned.
                if col == 0 {
                    out.push_str(&format!(" {c}{} |", " ".repeat(pad)));
                } else {
                    out.push_str(&format!(" {}{c} |", " ".repeat(pad)));
                }
            }
            out.push('\n');
            if n == 0 {
                out.push('|');
                for (col, w) in widths.iter().enumerate() {
                    if col == 0 {
                        out.push_str(&format!(" {} |", "-".repeat(*w)));
                    } else {
                        out.push_str(&format!(" {}: |", "-".repeat(w - 1)));
                    }
                }
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(median: f64, min: f64, max: f64) -> Option<Summary> {
        Some(Summary {
            median,
            min,
            max,
            count: 3,
        })
    }

    #[test]
    fn numbers_keep_three_significant_digits_or_all_integer_digits() {
        assert_eq!(format_number(12345.6), "12346");
        assert_eq!(format_number(45.26), "45.3");
        assert_eq!(format_number(0.8234), "0.82");
    }

    #[test]
    fn a_cell_shows_the_spread_unless_there_is_none() {
        assert_eq!(
            format_cell(s(200.0, 150.0, 250.0).as_ref()),
            "200 (150-250)"
        );
        assert_eq!(format_cell(s(7.0, 7.0, 7.0).as_ref()), "7.00");
        assert_eq!(format_cell(None), "-");
    }

    #[test]
    fn a_ratio_far_below_one_keeps_a_significant_digit() {
        let row = |b: f64| Row {
            metric: String::new(),
            qsd: s(18819.0, 1.0, 2.0),
            bulkhead: s(b, 1.0, 2.0),
            nbdkit: None,
        };
        assert_eq!(format_ratio(&row(76.1)), "0.004");
        assert_eq!(format_ratio(&row(9409.5)), "0.50");
    }

    #[test]
    fn the_table_is_aligned_markdown_with_the_ratio_of_medians() {
        let sections = [Section {
            title: "null".to_owned(),
            nbdkit: true,
            rows: vec![
                Row {
                    metric: "4k randread QD1 IOPS".to_owned(),
                    qsd: s(20000.0, 19000.0, 21000.0),
                    bulkhead: s(10000.0, 9000.0, 11000.0),
                    nbdkit: s(15000.0, 14000.0, 16000.0),
                },
                Row {
                    metric: "startup ms".to_owned(),
                    qsd: s(12.5, 12.0, 13.0),
                    bulkhead: s(5.0, 5.0, 5.0),
                    nbdkit: None,
                },
            ],
        }];
        let expected = "\
**null**

| metric               |                 qsd |           bulkhead | bulkhead/qsd |              nbdkit | bulkhead/nbdkit |
| -------------------- | ------------------: | -----------------: | -----------: | ------------------: | --------------: |
| 4k randread QD1 IOPS | 20000 (19000-21000) | 10000 (9000-11000) |         0.50 | 15000 (14000-16000) |            0.67 |
| startup ms           |    12.5 (12.0-13.0) |               5.00 |         0.40 |                   - |               - |
";
        assert_eq!(render(&sections), expected);
    }

    #[test]
    fn a_section_without_nbdkit_has_no_nbdkit_columns() {
        let sections = [Section {
            title: "qcow2".to_owned(),
            nbdkit: false,
            rows: vec![Row {
                metric: "4k randread QD1 IOPS".to_owned(),
                qsd: s(20000.0, 19000.0, 21000.0),
                bulkhead: s(10000.0, 9000.0, 11000.0),
                nbdkit: None,
            }],
        }];
        let expected = "\
**qcow2**

| metric               |                 qsd |           bulkhead | bulkhead/qsd |
| -------------------- | ------------------: | -----------------: | -----------: |
| 4k randread QD1 IOPS | 20000 (19000-21000) | 10000 (9000-11000) |         0.50 |
";
        assert_eq!(render(&sections), expected);
    }
}
