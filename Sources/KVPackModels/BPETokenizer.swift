import KVPack

/// Byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`) from a GGUF file's metadata:
/// the vocabulary, the ranked merges, the special tokens, and the pre-tokenizer that splits text
/// into words before merging.
///
/// Encoding: text -> (special tokens, if asked) -> pre-tokenizer pieces -> each piece's UTF-8
/// bytes as byte tokens -> merge the adjacent pair of lowest rank until none applies. Decoding
/// the ids gives the bytes back, except bytes the vocabulary has no token for: they are dropped,
/// as Hugging Face `tokenizers` (no unknown token) and llama.cpp drop them. SmolLM2 lacks six
/// C0 control characters (0x04 0x06 0x13 0x14 0x16 0x1D) and bytes that never occur in UTF-8;
/// `unrepresentableBytes` lists them.
public struct BPETokenizer: Sendable {
    public enum PreTokenizer: String, Sendable {
        /// GPT-2's split: contractions, letters, numbers, other symbols, whitespace.
        case gpt2
        /// SmolLM (llama.cpp `LLAMA_VOCAB_PRE_TYPE_SMOLLM`, HF `Digits(individual)` +
        /// `ByteLevel`): every number character alone first, then GPT-2's split.
        case smollm
    }

    /// Token texts as stored (bytes mapped to printable characters, GPT-2's `bytes_to_unicode`).
    public let vocabulary: [String]
    /// ggml token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    let types: [Int32]
    let preTokenizer: PreTokenizer
    private let ids: [String: Int32]
    /// (left id << 32 | right id) -> (rank, merged id)
    private let merges: [UInt64: (rank: Int32, merged: Int32)]
    /// Token of each byte; -1: none.
    private let byteTokens: [Int32]
    public let unrepresentableBytes: [UInt8]
    /// Bytes of each token (control tokens: their text).
    private let tokenBytes: [[UInt8]]
    /// Special (control and user-defined) tokens, longest first, for `parseSpecial`.
    private let specials: [(bytes: [UInt8], id: Int)]
    public let bos: Int?
    public let eos: Int?

    public init(gguf: GGUFFile) throws {
        let path = gguf.path
        let model = gguf.metadata["tokenizer.ggml.model"]?.asString ?? "(none)"
        guard model == "gpt2" else { throw ModelError(path, "tokenizer.ggml.model is \(model); only byte-level BPE (gpt2) is supported") }
        let pre = gguf.metadata["tokenizer.ggml.pre"]?.asString ?? "gpt2"
        switch pre {
        case "smollm": preTokenizer = .smollm
        case "gpt2", "gpt-2": preTokenizer = .gpt2
        default: throw ModelError(path, "tokenizer.ggml.pre is \(pre); the smollm and gpt2 pre-tokenizers are supported")
        }
        guard let tokens = gguf.metadata["tokenizer.ggml.tokens"]?.asArray?.map({ $0.asString }), !tokens.isEmpty,
              !tokens.contains(where: { $0 == nil }) else {
            throw ModelError(path, "tokenizer.ggml.tokens is missing or not an array of strings")
        }
        let vocabulary = tokens.map { $0! }
        guard vocabulary.count < Int(Int32.max) else { throw ModelError(path, "the vocabulary is too large") }
        self.vocabulary = vocabulary
        var types = [Int32](repeating: 1, count: vocabulary.count)
        if let t = gguf.metadata["tokenizer.ggml.token_type"]?.asArray {
            guard t.count == vocabulary.count else { throw ModelError(path, "tokenizer.ggml.token_type has \(t.count) entries for \(vocabulary.count) tokens") }
            for (i, v) in t.enumerated() { types[i] = Int32(truncatingIfNeeded: v.asInt ?? 1) }
        }
        self.types = types
        var ids: [String: Int32] = [:]
        ids.reserveCapacity(vocabulary.count)
        for (i, s) in vocabulary.enumerated() where ids[s] == nil { ids[s] = Int32(i) }
        self.ids = ids

        let table = Self.byteToCharacter
        let byteTokens: [Int32] = (0 ..< 256).map { ids[String(table[$0])] ?? -1 }
        self.byteTokens = byteTokens
        unrepresentableBytes = (0 ..< 256).filter { byteTokens[$0] < 0 }.map { UInt8($0) }
        var inverse: [Character: UInt8] = [:]
        for b in 0 ..< 256 { inverse[table[b]] = UInt8(b) }
        tokenBytes = vocabulary.enumerated().map { i, s in
            if types[i] == 3 || types[i] == 4 { return Array(s.utf8) }
            var out: [UInt8] = []
            for c in s {
                if let b = inverse[c] { out.append(b) } else { out += Array(String(c).utf8) }
            }
            return out
        }
        specials = vocabulary.indices.filter { types[$0] == 3 || types[$0] == 4 }
            .map { (Array(vocabulary[$0].utf8), $0) }.filter { !$0.0.isEmpty }
            .sorted { $0.0.count > $1.0.count }

        var merges: [UInt64: (rank: Int32, merged: Int32)] = [:]
        if let list = gguf.metadata["tokenizer.ggml.merges"]?.asArray {
            merges.reserveCapacity(list.count)
            for (rank, item) in list.enumerated() {
                guard let text = item.asString else { throw ModelError(path, "tokenizer.ggml.merges[\(rank)] is not a string") }
                let parts = text.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
                guard parts.count == 2, let l = ids[String(parts[0])], let r = ids[String(parts[1])],
                      let m = ids[String(parts[0]) + String(parts[1])] else {
                    throw ModelError(path, "tokenizer.ggml.merges[\(rank)] \"\(text)\" does not name two tokens whose join is a token")
                }
                let key = UInt64(UInt32(l)) << 32 | UInt64(UInt32(r))
                if merges[key] == nil { merges[key] = (Int32(rank), m) }
            }
        }
        self.merges = merges
        func special(_ key: String) -> Int? {
            guard let v = gguf.metadata[key]?.asInt, (0 ..< vocabulary.count).contains(v) else { return nil }
            return v
        }
        bos = special("tokenizer.ggml.bos_token_id")
        eos = special("tokenizer.ggml.eos_token_id")
    }

    public func id(of token: String) -> Int? { ids[token].map(Int.init) }

    public func isSpecial(_ id: Int) -> Bool { vocabulary.indices.contains(id) && (types[id] == 3 || types[id] == 4) }

    // MARK: Encoding

    /// Token ids of `text`. With `parseSpecial`, special-token texts in it (`<|im_end|>`) become
    /// those tokens; without (the default, for anything a user typed), they are plain text.
    public func encode(_ text: String, parseSpecial: Bool = false) -> [Int] {
        var out: [Int] = []
        let bytes = Array(text.utf8)
        guard parseSpecial, !specials.isEmpty else {
            encodeText(bytes[...], into: &out)
            return out
        }
        var start = 0, i = 0
        scan: while i < bytes.count {
            for s in specials where bytes.count - i >= s.bytes.count && bytes[i ..< i + s.bytes.count].elementsEqual(s.bytes) {
                encodeText(bytes[start ..< i], into: &out)
                out.append(s.id)
                i += s.bytes.count
                start = i
                continue scan
            }
            i += 1
        }
        encodeText(bytes[start...], into: &out)
        return out
    }

    private func encodeText(_ bytes: ArraySlice<UInt8>, into out: inout [Int]) {
        guard !bytes.isEmpty else { return }
        let text = String(decoding: bytes, as: UTF8.self)
        for piece in Self.split(text, preTokenizer) { mergePiece(Array(piece.utf8), into: &out) }
    }

    private func mergePiece(_ bytes: [UInt8], into out: inout [Int]) {
        var symbols = bytes.map { byteTokens[Int($0)] }
        if !unrepresentableBytes.isEmpty { symbols.removeAll { $0 < 0 } }
        while symbols.count > 1 {
            var best = -1
            var bestRank = Int32.max, bestMerged: Int32 = 0
            for j in 0 ..< symbols.count - 1 {
                let key = UInt64(UInt32(symbols[j])) << 32 | UInt64(UInt32(symbols[j + 1]))
                if let m = merges[key], m.rank < bestRank { best = j; bestRank = m.rank; bestMerged = m.merged }
            }
            guard best >= 0 else { break }
            symbols[best] = bestMerged
            symbols.remove(at: best + 1)
        }
        out += symbols.map(Int.init)
    }

    /// The pre-tokenizer's pieces of `text` (they concatenate back to `text`).
    static func split(_ text: String, _ kind: PreTokenizer) -> [Substring] {
        let scalars = Array(text.unicodeScalars)
        var pieces: [Range<Int>] = []
        if kind == .smollm {
            var start = 0
            for i in scalars.indices where isNumber(scalars[i]) {
                if start < i { gpt2Split(scalars, start ..< i, into: &pieces) }
                pieces.append(i ..< i + 1)
                start = i + 1
            }
            if start < scalars.count { gpt2Split(scalars, start ..< scalars.count, into: &pieces) }
        } else {
            gpt2Split(scalars, 0 ..< scalars.count, into: &pieces)
        }
        // Map scalar ranges back to substrings.
        var offsets: [String.Index] = []
        offsets.reserveCapacity(scalars.count + 1)
        var index = text.unicodeScalars.startIndex
        for _ in 0 ..< scalars.count {
            offsets.append(index)
            index = text.unicodeScalars.index(after: index)
        }
        offsets.append(text.endIndex)
        return pieces.map { Substring(text.unicodeScalars[offsets[$0.lowerBound] ..< offsets[$0.upperBound]]) }
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` over
    /// `range`, each match a piece, the alternatives tried in that order at each position.
    static func gpt2Split(_ u: [Unicode.Scalar], _ range: Range<Int>, into pieces: inout [Range<Int>]) {
        let end = range.upperBound
        var i = range.lowerBound
        func run(_ from: Int, _ matches: (Unicode.Scalar) -> Bool) -> Int {
            var j = from
            while j < end, matches(u[j]) { j += 1 }
            return j
        }
        while i < end {
            let c = u[i]
            if c == "'", i + 1 < end {
                let n1 = u[i + 1], n2: Unicode.Scalar? = i + 2 < end ? u[i + 2] : nil
                var length = 0
                if "stmd".unicodeScalars.contains(n1) { length = 2 }
                else if n1 == "r", n2 == "e" { length = 3 }
                else if n1 == "v", n2 == "e" { length = 3 }
                else if n1 == "l", n2 == "l" { length = 3 }
                if length > 0 {
                    pieces.append(i ..< i + length)
                    i += length
                    continue
                }
            }
            let j = (c == " " && i + 1 < end) ? i + 1 : i
            let d = u[j]
            if isLetter(d) || isNumber(d) || !isSpace(d) {
                // With the optional leading space (j = i + 1) the class is the next character's.
                let k: Int
                if isLetter(d) { k = run(j, isLetter) }
                else if isNumber(d) { k = run(j, isNumber) }
                else { k = run(j) { !isSpace($0) && !isLetter($0) && !isNumber($0) } }
                pieces.append(i ..< k)
                i = k
                continue
            }
            // Whitespace: the run, minus its last character if something non-space follows
            // (that character then leads the next piece), but never empty.
            let k = run(i, isSpace)
            if k == end || k - i == 1 {
                pieces.append(i ..< k)
                i = k
            } else {
                pieces.append(i ..< k - 1)
                i = k - 1
            }
        }
    }

    static func isLetter(_ s: Unicode.Scalar) -> Bool {
        if s.isASCII { return (s.value | 0x20) >= 0x61 && (s.value | 0x20) <= 0x7A }
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }

    static func isNumber(_ s: Unicode.Scalar) -> Bool {
        if s.isASCII { return s.value >= 0x30 && s.value <= 0x39 }
        switch s.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }

    static func isSpace(_ s: Unicode.Scalar) -> Bool { s.properties.isWhitespace }

    // MARK: Decoding

    /// The bytes of `ids` (special tokens as their text when `renderSpecial`, else nothing).
    public func decodeBytes(_ ids: [Int], renderSpecial: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        for id in ids where tokenBytes.indices.contains(id) {
            if !renderSpecial, isSpecial(id) { continue }
            out += tokenBytes[id]
        }
        return out
    }

    /// Text of `ids`; bytes that are not valid UTF-8 (a sequence cut mid-character) become U+FFFD.
    public func decode(_ ids: [Int], renderSpecial: Bool = true) -> String {
        String(decoding: decodeBytes(ids, renderSpecial: renderSpecial), as: UTF8.self)
    }

    /// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the others are shifted
    /// to U+0100 and up, so every byte is a visible character in token texts.
    static let byteToCharacter: [Character] = {
        var printable = Array(0x21 ... 0x7E) + Array(0xA1 ... 0xAC) + Array(0xAE ... 0xFF)
        var table = [Character](repeating: " ", count: 256)
        for b in printable { table[b] = Character(Unicode.Scalar(UInt32(b))!) }
        var n = 0
        for b in 0 ..< 256 where !printable.contains(b) {
            table[b] = Character(Unicode.Scalar(UInt32(256 + n))!)
            n += 1
        }
        printable.removeAll()
        return table
    }()
}

/// Emits complete UTF-8 characters as token bytes arrive (a character may span tokens).
public struct UTF8Stream {
    private var pending: [UInt8] = []
    public init() {}

    /// The longest decodable prefix of everything fed so far; the rest waits for more bytes.
    public mutating func feed(_ bytes: [UInt8]) -> String {
        pending += bytes
        var cut = pending.count
        // Back up over an incomplete trailing sequence (at most 3 bytes).
        var i = pending.count - 1, back = 0
        while i >= 0, back < 4, pending[i] & 0xC0 == 0x80 { i -= 1; back += 1 }
        if i >= 0 {
            let lead = pending[i]
            let need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1
            if pending.count - i < need { cut = i }
        }
        let text = String(decoding: pending[..<cut], as: UTF8.self)
        pending.removeFirst(cut)
        return text
    }

    public mutating func flush() -> String {
        defer { pending = [] }
        return String(decoding: pending, as: UTF8.self)
    }
}
