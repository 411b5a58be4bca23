//! The documentation's links resolve: every relative link in `README.md` and `docs/*.md` names a
//! file of the repository, and every `#anchor` names a heading of the file it points at.
//! (External `http(s)://` links are not fetched: there is no network here.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents whose links are checked.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let dir = root().join("docs");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        found.sort();
        docs.extend(found);
    }
    docs
}

/// `[text](target)` links outside code fences and inline code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans so that `[a](b)` inside backticks is not a link.
        let mut plain = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                plain.push(c);
            }
        }
        let mut rest = plain.as_str();
        while let Some(pos) = rest.find("](") {
            let after = &rest[pos + 2..];
            match after.find(')') {
                Some(end) => {
                    out.push(after[..end].trim().to_string());
                    rest = &after[end..];
                }
                None => break,
            }
        }
    }
    out
}

/// GitHub-style anchors of a Markdown file's headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| {
                if c.is_alphanumeric() || c == '-' || c == '_' {
                    Some(c)
                } else if c == ' ' {
                    Some('-')
                } else {
                    None
                }
            })
            .collect();
        set.insert(slug);
    }
    set
}

fn check(doc: &Path, problems: &mut Vec<String>) {
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    let base = doc.parent().unwrap_or(Path::new("."));
    for link in links(&text) {
        if link.starts_with("http://") || link.starts_with("https://") || link.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match link.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (link.as_str(), None),
        };
        let target = if path.is_empty() {
            doc.to_path_buf()
        } else {
            base.join(path)
        };
        if !target.exists() {
            problems.push(format!("{}: link to missing {}", doc.display(), link));
            continue;
        }
        if let Some(anchor) = anchor {
            let text = std::fs::read_to_string(&target).unwrap_or_default();
            if !anchors(&text).contains(anchor) {
                problems.push(format!(
                    "{}: no heading for #{anchor} in {}",
                    doc.display(),
                    target.display()
                ));
            }
        }
    }
}

#[test]
fn every_documentation_link_resolves() {
    let docs = documents();
    assert!(docs.len() > 1, "docs/ holds the topic documents");
    let mut problems = Vec::new();
    for doc in &docs {
        check(doc, &mut problems);
    }
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn every_topic_document_is_reachable_from_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap_or_default();
    let linked: BTreeSet<String> = links(&readme).into_iter().collect();
    for doc in documents().iter().skip(1) {
        let name = format!("docs/{}", doc.file_name().and_then(|n| n.to_str()).unwrap_or_default());
        assert!(linked.contains(&name), "README.md does not link {name}");
    }
}

#[test]
fn the_link_parser_sees_links_and_skips_code() {
    let text = "see [a](docs/a.md) and `[b](c)`\n```\n[d](e)\n```\n[f](g#h)";
    assert_eq!(links(text), vec!["docs/a.md".to_string(), "g#h".to_string()]);
    assert!(anchors("## The `pvault` CLI\n").contains("the-pvault-cli"));
}
