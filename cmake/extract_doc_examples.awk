# Writes every complete C program (a ```c block containing "int main(") of a
# Markdown file to <out><n>.c, so docs examples are compiled and run as tests.
/^```c[[:space:]]*$/ { inb = 1; buf = ""; next }
/^```[[:space:]]*$/ {
  if (inb && buf ~ /int main\(/) {
    n++
    f = out n ".c"
    printf "%s", buf > f
    close(f)
  }
  inb = 0
  next
}
inb { buf = buf $0 "\n" }
