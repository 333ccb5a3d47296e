//! A small, bounded XML reader for DiskDescriptor.xml.
//!
//! It reads elements, their text, comments, processing instructions (`<?xml ...?>`),
//! CDATA and the five predefined entities plus numeric character references. Attributes are
//! skipped. DOCTYPE is refused, so no entity can expand. The input size, nesting depth and
//! element count are capped, and the parser is a loop over an explicit stack (no recursion),
//! so hostile input costs at most linear time and bounded memory.
//!
//! Why not `roxmltree`: it is well kept and refuses DTDs by default, and it would
//! replace this file, but it adds about 69 KB to a stripped binary (measured on a
//! small program that parses with it), which also lands in every appliance, for a
//! reader of one small file type; it bounds node count but not depth, so the depth
//! limit would still be ours; and this reader reads only the subset DiskDescriptor.xml
//! uses (attributes are skipped, never stored), is covered by property tests and the
//! `descriptor_xml` fuzz target, and stays small enough to review in one sitting.

/// Largest document read, in bytes.
pub const MAX_BYTES: usize = 1 << 20;
/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 32;
/// Most elements accepted in one document.
pub const MAX_ELEMENTS: usize = 10_000;

/// One element: its name, its direct text (concatenated, entities decoded) and children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Tag name, as written (namespaces are not interpreted).
    pub name: String,
    /// Text directly inside this element.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Element>,
}

impl Element {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// All children named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Trimmed text of the first child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }
}

/// Parse a whole document and return its root element. The error is one sentence with a
/// byte offset.
pub fn parse(input: &[u8]) -> Result<Element, String> {
    if input.len() > MAX_BYTES {
        return Err(format!(
            "XML is {} bytes, larger than the {MAX_BYTES}-byte limit",
            input.len()
        ));
    }
    let text = std::str::from_utf8(input)
        .map_err(|e| format!("XML is not UTF-8 (byte {})", e.valid_up_to()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Parser {
        s: text,
        pos: 0,
        stack: Vec::new(),
        root: None,
        elements: 0,
    }
    .run()
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
    stack: Vec<Element>,
    root: Option<Element>,
    elements: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("XML: {what} at byte {}", self.pos))
    }

    /// Move past the next `end`, or fail naming `what` was left open.
    fn skip_past(&mut self, end: &str, what: &str) -> Result<usize, String> {
        match self.rest().find(end) {
            Some(i) => {
                let start = self.pos;
                self.pos += i + end.len();
                Ok(start)
            }
            None => self.err(&format!("unterminated {what}")),
        }
    }

    fn run(mut self) -> Result<Element, String> {
        while self.pos < self.s.len() {
            let rest = self.rest();
            if rest.starts_with("<?") {
                self.skip_past("?>", "processing instruction")?;
            } else if rest.starts_with("<!--") {
                self.skip_past("-->", "comment")?;
            } else if rest.starts_with("<![CDATA[") {
                self.pos += "<![CDATA[".len();
                let start = self.skip_past("]]>", "CDATA section")?;
                let data = &self.s[start..self.pos - 3];
                self.add_text(data.to_string())?;
            } else if rest.starts_with("<!") {
                return self.err("DOCTYPE and other declarations are not accepted");
            } else if rest.starts_with("</") {
                self.close_tag()?;
            } else if rest.starts_with('<') {
                self.open_tag()?;
            } else {
                let len = rest.find('<').unwrap_or(rest.len());
                let raw = &rest[..len];
                let decoded =
                    decode_entities(raw).map_err(|w| format!("XML: {w} at byte {}", self.pos))?;
                self.pos += len;
                self.add_text(decoded)?;
            }
        }
        if let Some(open) = self.stack.last() {
            return self.err(&format!("element <{}> is not closed", open.name));
        }
        match self.root.take() {
            Some(root) => Ok(root),
            None => self.err("no root element"),
        }
    }

    fn add_text(&mut self, text: String) -> Result<(), String> {
        match self.stack.last_mut() {
            Some(el) => {
                el.text.push_str(&text);
                Ok(())
            }
            None if text.trim().is_empty() => Ok(()),
            None => self.err("text outside the root element"),
        }
    }

    fn name_at(&self, from: usize) -> &str {
        let s = &self.s[from..];
        let end = s
            .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
            .unwrap_or(s.len());
        &s[..end]
    }

    fn open_tag(&mut self) -> Result<(), String> {
        let name = self.name_at(self.pos + 1).to_string();
        if !valid_name(&name) {
            return self.err(&format!("invalid element name {name:?}"));
        }
        self.pos += 1 + name.len();
        let self_closing = self.skip_attributes()?;
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return self.err(&format!("more than {MAX_ELEMENTS} elements"));
        }
        if self.stack.is_empty() && self.root.is_some() {
            return self.err("more than one root element");
        }
        let el = Element {
            name,
            ..Element::default()
        };
        if self_closing {
            self.attach(el);
        } else {
            if self.stack.len() >= MAX_DEPTH {
                return self.err(&format!("elements nested deeper than {MAX_DEPTH}"));
            }
            self.stack.push(el);
        }
        Ok(())
    }

    /// Skip attributes up to and including `>` (quoted values may contain `>`); true for `/>`.
    fn skip_attributes(&mut self) -> Result<bool, String> {
        let mut quote: Option<char> = None;
        for (i, c) in self.rest().char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '<') => break,
                (None, '>') => {
                    let self_closing = self.rest()[..i].ends_with('/');
                    self.pos += i + 1;
                    return Ok(self_closing);
                }
                (None, _) => {}
            }
        }
        self.err("unterminated start tag")
    }

    fn close_tag(&mut self) -> Result<(), String> {
        let name = self.name_at(self.pos + 2).to_string();
        let after = self.pos + 2 + name.len();
        let rest = &self.s[after..];
        let gt = match rest.find('>') {
            Some(i) if rest[..i].trim().is_empty() => i,
            _ => return self.err("malformed end tag"),
        };
        match self.stack.pop() {
            Some(el) if el.name == name => {
                self.pos = after + gt + 1;
                self.attach(el);
                Ok(())
            }
            Some(el) => self.err(&format!("</{name}> closes <{}>", el.name)),
            None => self.err(&format!("</{name}> without a start tag")),
        }
    }

    fn attach(&mut self, el: Element) {
        match self.stack.last_mut() {
            Some(parent) => parent.children.push(el),
            None => self.root = Some(el),
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
}

/// Replace `&lt; &gt; &amp; &quot; &apos;` and `&#N;` / `&#xH;` with their characters.
pub fn decode_entities(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after
            .find(';')
            .filter(|&i| i <= 10)
            .ok_or("unterminated entity reference")?;
        let name = &after[..semi];
        let ch = match name {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => numeric_reference(name).ok_or_else(|| format!("unknown entity &{name};"))?,
        };
        out.push(ch);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn numeric_reference(name: &str) -> Option<char> {
    let digits = name.strip_prefix('#')?;
    let code = match digits
        .strip_prefix('x')
        .or_else(|| digits.strip_prefix('X'))
    {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u32>().ok()?,
    };
    char::from_u32(code).filter(|&c| c != '\0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_nested_elements_text_and_entities() {
        let doc = br#"<?xml version="1.0"?>
<!-- c --><a x="1>2"><b>x &amp; &lt;y&gt; &#65;&#x42;</b><c/><b>2</b></a>"#;

        let root = parse(doc).unwrap();

        assert_eq!(root.name, "a");
        assert_eq!(root.child_text("b"), Some("x & <y> AB"));
        assert_eq!(root.children_named("b").count(), 2);
        assert!(root.child("c").unwrap().children.is_empty());
    }

    #[test]
    fn reads_cdata_verbatim() {
        let root = parse(b"<a><![CDATA[<&>]]></a>").unwrap();

        assert_eq!(root.text, "<&>");
    }

    #[test]
    fn refuses_doctype() {
        let err = parse(b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>").unwrap_err();

        assert!(err.contains("DOCTYPE"), "{err}");
    }

    #[test]
    fn refuses_unknown_entity() {
        let err = parse(b"<a>&x;</a>").unwrap_err();

        assert!(err.contains("unknown entity &x;"), "{err}");
    }

    #[test]
    fn refuses_mismatched_end_tag() {
        let err = parse(b"<a><b></a>").unwrap_err();

        assert!(err.contains("</a> closes <b>"), "{err}");
    }

    #[test]
    fn refuses_unclosed_root() {
        let err = parse(b"<a><b></b>").unwrap_err();

        assert!(err.contains("<a> is not closed"), "{err}");
    }

    #[test]
    fn refuses_deep_nesting() {
        let doc = "<a>".repeat(MAX_DEPTH + 1);

        let err = parse(doc.as_bytes()).unwrap_err();

        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn refuses_too_many_elements() {
        let doc = format!("<a>{}</a>", "<b/>".repeat(MAX_ELEMENTS));

        let err = parse(doc.as_bytes()).unwrap_err();

        assert!(err.contains("more than 10000 elements"), "{err}");
    }

    #[test]
    fn refuses_oversized_input() {
        let doc = vec![b' '; MAX_BYTES + 1];

        let err = parse(&doc).unwrap_err();

        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn refuses_two_roots_and_stray_text() {
        assert!(parse(b"<a/><b/>")
            .unwrap_err()
            .contains("more than one root"));
        assert!(parse(b"x<a/>").unwrap_err().contains("text outside"));
    }

    proptest! {
        #[test]
        fn never_panics(doc in "[<>/a-c!?\\[\\]&#;x0-9 \"'-]{0,64}") {
            let _ = parse(doc.as_bytes());
        }

        #[test]
        fn text_round_trips_through_escaping(text in "\\PC{0,40}") {
            let escaped = text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
            let doc = format!("<a>{escaped}</a>");

            let root = parse(doc.as_bytes()).unwrap();

            prop_assert_eq!(root.text, text);
        }
    }
}
