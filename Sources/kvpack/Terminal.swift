#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Ctrl-C while a reply streams: the handler only sets this flag (all a signal handler may
/// safely do); the chat checks it before each token. The handler is installed with
/// SA_RESETHAND, so a second Ctrl-C before the chat re-arms it ends the process the default
/// way (the file keeps its last commit).
let interruptRequested = Atomic<Bool>(false)

enum Interrupts {
    /// Arms the handler (again) and clears the flag. Without SA_RESTART, a blocking read of
    /// standard input returns when Ctrl-C arrives, so a chat waiting for piped input ends too.
    static func arm() {
        interruptRequested.store(false, ordering: .relaxed)
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in interruptRequested.store(true, ordering: .relaxed) }
        sigemptyset(&action.sa_mask)
        action.sa_flags = Int32(truncatingIfNeeded: SA_RESETHAND)
        sigaction(SIGINT, &action, nil)
        // A parent may have started us with SIGINT blocked (the mask is inherited): unblock it.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    static var requested: Bool { interruptRequested.load(ordering: .relaxed) }
}

/// A line editor for a terminal, in the manner of linenoise: the terminal is put in raw mode
/// for one line, then restored. Left/right, Home/End (and Ctrl-A/Ctrl-E), Backspace/Delete,
/// Ctrl-U/Ctrl-K/Ctrl-W, Up/Down through this session's history; lines longer than the terminal
/// wrap and redraw correctly. Ctrl-C gives `.interrupt`, Ctrl-D on an empty line `.end`.
final class LineEditor {
    enum Result: Equatable {
        case line(String)
        case end
        case interrupt
    }

    private(set) var history: [String] = []
    private let input: Int32 = 0
    private let output: Int32 = 2

    /// Whether standard input and standard error are a terminal (else read lines plainly).
    static var available: Bool { isatty(0) == 1 && isatty(2) == 1 }

    func read(prompt: String) -> Result {
        var saved = termios()
        guard tcgetattr(input, &saved) == 0 else { return plainRead(prompt: prompt) }
        var raw = saved
        raw.c_iflag &= ~tcflag_t(BRKINT | ICRNL | INPCK | ISTRIP | IXON)
        raw.c_lflag &= ~tcflag_t(ECHO | ICANON | IEXTEN | ISIG)
        withUnsafeMutableBytes(of: &raw.c_cc) { cc in
            cc[Int(VMIN)] = 1
            cc[Int(VTIME)] = 0
        }
        guard tcsetattr(input, TCSAFLUSH, &raw) == 0 else { return plainRead(prompt: prompt) }
        defer {
            tcsetattr(input, TCSAFLUSH, &saved)
            write("\r\n")
        }
        return edit(prompt: prompt)
    }

    private func plainRead(prompt: String) -> Result {
        write(prompt)
        return readLine(strippingNewline: true).map { .line($0) } ?? .end
    }

    private struct State {
        var text: [Character] = []
        var cursor = 0
        /// The row (from the line's first) the last redraw left the cursor on.
        var cursorRow = 0
    }

    private func edit(prompt: String) -> Result {
        var s = State()
        let promptWidth = prompt.count
        var historyIndex = history.count
        var draft: [Character] = []
        redraw(prompt: prompt, promptWidth: promptWidth, &s)
        while true {
            guard let byte = readByte() else { return s.text.isEmpty ? .end : .line(String(s.text)) }
            switch byte {
            case 13, 10:
                let line = String(s.text)
                if !line.isEmpty, history.last != line { history.append(line) }
                s.cursor = s.text.count
                redraw(prompt: prompt, promptWidth: promptWidth, &s)
                return .line(line)
            case 3: return .interrupt
            case 4:
                if s.text.isEmpty { return .end }
                if s.cursor < s.text.count { s.text.remove(at: s.cursor) }
            case 127, 8:
                if s.cursor > 0 { s.cursor -= 1; s.text.remove(at: s.cursor) }
            case 1: s.cursor = 0
            case 5: s.cursor = s.text.count
            case 2: s.cursor = max(s.cursor - 1, 0)
            case 6: s.cursor = min(s.cursor + 1, s.text.count)
            case 21: s.text.removeSubrange(0 ..< s.cursor); s.cursor = 0
            case 11: s.text.removeSubrange(s.cursor...)
            case 23:
                var start = s.cursor
                while start > 0, s.text[start - 1] == " " { start -= 1 }
                while start > 0, s.text[start - 1] != " " { start -= 1 }
                s.text.removeSubrange(start ..< s.cursor)
                s.cursor = start
            case 27:
                switch readEscape() {
                case "D": s.cursor = max(s.cursor - 1, 0)
                case "C": s.cursor = min(s.cursor + 1, s.text.count)
                case "H", "1~", "7~": s.cursor = 0
                case "F", "4~", "8~": s.cursor = s.text.count
                case "3~": if s.cursor < s.text.count { s.text.remove(at: s.cursor) }
                case let key where key == "A" || key == "B":
                    // History: Up goes back, Down forward; the line being typed is kept as a draft.
                    if historyIndex == history.count { draft = s.text }
                    historyIndex = key == "A" ? max(historyIndex - 1, 0) : min(historyIndex + 1, history.count)
                    s.text = historyIndex == history.count ? draft : Array(history[historyIndex])
                    s.cursor = s.text.count
                default: break
                }
            default:
                guard byte >= 32 else { continue }
                // A UTF-8 sequence: its lead byte says how many continuation bytes follow.
                var bytes = [byte]
                let more = byte >= 0xF0 ? 3 : byte >= 0xE0 ? 2 : byte >= 0xC0 ? 1 : 0
                for _ in 0 ..< more { if let c = readByte() { bytes.append(c) } }
                for c in String(decoding: bytes, as: UTF8.self) {
                    s.text.insert(c, at: s.cursor)
                    s.cursor += 1
                }
            }
            redraw(prompt: prompt, promptWidth: promptWidth, &s)
        }
    }

    /// Rewrites the prompt and line from their first row, clears what is below, and puts the
    /// cursor back where it belongs (linenoise's multi-line refresh).
    private func redraw(prompt: String, promptWidth: Int, _ s: inout State) {
        let columns = max(terminalColumns(), 1)
        var out = ""
        if s.cursorRow > 0 { out += "\u{1B}[\(s.cursorRow)A" }
        out += "\r" + prompt + String(s.text) + "\u{1B}[J"
        let total = promptWidth + s.text.count
        // At the right edge the terminal waits to wrap: force the wrap so the cursor has a row.
        if total > 0, total % columns == 0, s.cursor == s.text.count { out += "\n\r" }
        let endRow = total / columns
        let cursorAt = promptWidth + s.cursor
        let cursorRow = cursorAt / columns
        if endRow > cursorRow { out += "\u{1B}[\(endRow - cursorRow)A" }
        out += "\r"
        if cursorAt % columns > 0 { out += "\u{1B}[\(cursorAt % columns)C" }
        write(out)
        s.cursorRow = cursorRow
    }

    /// The rest of an escape sequence after ESC, as its parameters and final byte ("D" for
    /// ESC [ D or ESC O D, "3~" for ESC [ 3 ~); an unknown sequence is read whole and ignored.
    private func readEscape() -> String {
        guard let introducer = readByte() else { return "" }
        guard introducer == 91 || introducer == 79 else { return "" }
        var key = ""
        while let b = readByte() {
            key.append(Character(UnicodeScalar(b)))
            if (0x40 ... 0x7E).contains(b) { break }
            if key.count > 16 { break }
        }
        return key
    }

    private func terminalColumns() -> Int {
        var size = winsize()
        return ioctl(output, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 ? Int(size.ws_col) : 80
    }

    private func readByte() -> UInt8? {
        var byte: UInt8 = 0
        while true {
            let n = Glibc.read(input, &byte, 1)
            if n == 1 { return byte }
            if n < 0, errno == EINTR { continue }
            return nil
        }
    }

    private func write(_ text: String) {
        var bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(output, $0.baseAddress! + done, $0.count - done) }
            if n <= 0 { if errno == EINTR { continue }; return }
            done += n
        }
    }
}
